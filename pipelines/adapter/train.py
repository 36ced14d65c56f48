"""Training an adapter on frozen model vectors (TensorFlow / Keras, CPU): linear, or
linear plus a ReLU hidden layer (`adapter.hidden`, kind "mlp", an option).

The projection W [in_dim, out_dim] starts as the top `out_dim` right singular vectors of
the training vectors (the best rank-out_dim approximation of their geometry: cosine
scores close to the raw ones), and is trained with a **supervised-contrastive loss**
(Khosla et al. 2020): in a batch of P products x up to M of their images / labelled
photos, each row's positives are the other rows of its product and everything else is
negative; temperature `adapter.temperature`. Chosen over a proxy / normalised-softmax
loss because it needs no per-product parameters (it works for products it never saw,
which the held-out products of the gate measure); a proxy loss was not measured here.
The MLP option was measured on the grocery data (docs/EVALUATION.md, "Adapters"): the
gate refused it (validation recall@1 0.863 vs identity 0.913) and outside the gate it
scored below the linear map on the test photos (0.738 vs 0.757), so linear stays the
default.

Deterministic for a seed on one machine (numpy RNG for batches, TF seeded, CPU only).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

LOSS_NAME = "supervised_contrastive"


@dataclass(frozen=True)
class TrainParams:
    out_dim: int = 256
    epochs: int = 60
    learning_rate: float = 3e-4
    temperature: float = 0.1
    products_per_batch: int = 32
    samples_per_product: int = 8
    seed: int = 0
    hidden: int = 0            # 0: linear; > 0: linear + a ReLU hidden layer of this width
    init_sample: int = 100_000  # rows (seeded sample) the initialisation is computed on

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainParams":
        return cls(out_dim=cfg.dim, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                   temperature=cfg.temperature, products_per_batch=cfg.products_per_batch,
                   samples_per_product=cfg.samples_per_product, seed=cfg.seed,
                   hidden=cfg.hidden, init_sample=cfg.init_sample)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def initial_weights(x: np.ndarray, out_dim: int, sample: int | None = None, seed: int = 0,
                    chunk: int = 8192) -> np.ndarray:
    """[in_dim, out_dim]: the top right singular vectors of `x` (padded with the next
    coordinate axes when x has fewer rows or dimensions than out_dim).

    Computed as the top eigenvectors of the Gram matrix x^T x ([in_dim, in_dim], float64,
    accumulated over float32 chunks of `chunk` rows), on a seeded sample of at most
    `sample` rows (None: all): memory is O(in_dim^2 + chunk * in_dim) whatever N, with no
    float64 or full-size copy of x. Column signs are fixed (largest entry positive), so
    the result does not depend on the eigen-solver's sign convention."""
    n, in_dim = x.shape
    rows: np.ndarray | None = None
    if sample is not None and n > sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    gram = np.zeros((in_dim, in_dim), np.float64)
    total = n if rows is None else len(rows)
    for s in range(0, total, chunk):
        block = x[s:s + chunk] if rows is None else x[rows[s:s + chunk]]
        b = np.asarray(block, np.float32)
        gram += (b.T @ b).astype(np.float64)
    evals, evecs = np.linalg.eigh(gram)
    keep = min(out_dim, in_dim, total)
    top = evecs[:, ::-1][:, :keep]
    top = top * np.where(top[np.abs(top).argmax(axis=0), np.arange(keep)] < 0, -1.0, 1.0)
    w = np.zeros((in_dim, out_dim), np.float64)
    w[:, :keep] = top
    for j in range(keep, out_dim):  # more outputs than the data spans: spare orthogonal axes
        e = np.zeros(in_dim)
        e[j % in_dim] = 1.0
        e -= w[:, :j] @ (w[:, :j].T @ e)
        nrm = np.linalg.norm(e)
        w[:, j] = e / nrm if nrm > 1e-9 else 0.0
    return w.astype(np.float32)


def _batches(labels: np.ndarray, params: TrainParams, rng: np.random.Generator
             ) -> list[np.ndarray]:
    """One epoch: batches of P products x up to M rows each, covering every row once
    (products with more rows than M appear in several batches)."""
    by_product: dict[int, list[int]] = {}
    for i in rng.permutation(len(labels)):
        by_product.setdefault(int(labels[i]), []).append(int(i))
    chunks = []  # (product, rows) groups of up to M rows
    for rows in by_product.values():
        for s in range(0, len(rows), params.samples_per_product):
            chunks.append(rows[s:s + params.samples_per_product])
    order = rng.permutation(len(chunks))
    out, current, products = [], [], 0
    for c in order:
        current.extend(chunks[c])
        products += 1
        if products == params.products_per_batch:
            out.append(np.asarray(current, np.int64))
            current, products = [], 0
    if current:
        out.append(np.asarray(current, np.int64))
    return out


@dataclass
class _Model:
    """The trainable projection: the linear map W (+ the MLP's residual branch)."""
    linear: Any
    hidden: Any = None   # Dense(H, relu) on the raw vector (kind "mlp")
    out: Any = None      # Dense(out_dim), starts at zero

    @property
    def variables(self) -> list[Any]:
        layers = [self.linear] + ([self.hidden, self.out] if self.hidden is not None else [])
        return [v for layer in layers for v in layer.trainable_variables]

    def __call__(self, xb: Any) -> Any:
        y = self.linear(xb)
        if self.hidden is not None:
            y = y + self.out(self.hidden(xb))
        return y

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"weights": np.asarray(self.linear.kernel.numpy(), np.float32)}
        if self.hidden is not None:
            arrays["hidden_weights"] = np.asarray(self.hidden.kernel.numpy(), np.float32)
            arrays["hidden_bias"] = np.asarray(self.hidden.bias.numpy(), np.float32)
            arrays["output_weights"] = np.asarray(self.out.kernel.numpy(), np.float32)
        return arrays


def _build_model(x: np.ndarray, params: TrainParams) -> _Model:
    """The layers at their initialisation: W = the top singular vectors of x, the MLP's
    hidden layer Glorot-seeded and its output layer zero (so it starts as the linear map)."""
    import keras
    w0 = initial_weights(x, params.out_dim, params.init_sample, params.seed)
    in_dim = x.shape[1]
    linear = keras.layers.Dense(params.out_dim, use_bias=False,
                                kernel_initializer=keras.initializers.Constant(w0))
    linear.build((None, in_dim))
    if not params.hidden:
        return _Model(linear)
    hidden = keras.layers.Dense(params.hidden, activation="relu",
                                kernel_initializer=keras.initializers.GlorotUniform(
                                    seed=params.seed))
    hidden.build((None, in_dim))
    out = keras.layers.Dense(params.out_dim, use_bias=False, kernel_initializer="zeros")
    out.build((None, params.hidden))
    return _Model(linear, hidden, out)


def supervised_contrastive_loss(z: Any, yb: Any, temperature: float) -> Any:
    """The batch's mean supervised-contrastive loss of L2-normalised rows z [n, d] with
    labels yb [n] (anchors without a positive in the batch are left out)."""
    import tensorflow as tf
    logits = tf.matmul(z, z, transpose_b=True) * (1.0 / temperature)
    n = tf.shape(z)[0]
    self_mask = tf.eye(n, dtype=tf.bool)
    logits = tf.where(self_mask, tf.fill(tf.shape(logits), -1e9), logits)
    same = tf.logical_and(tf.equal(yb[:, None], yb[None, :]), tf.logical_not(self_mask))
    pos = tf.cast(same, tf.float32)
    log_prob = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    num_pos = tf.reduce_sum(pos, axis=1)
    per_anchor = -tf.reduce_sum(pos * log_prob, axis=1) / tf.maximum(num_pos, 1.0)
    has = tf.cast(num_pos > 0, tf.float32)
    return tf.reduce_sum(per_anchor * has) / tf.maximum(tf.reduce_sum(has), 1.0)


def _make_step(model: _Model, params: TrainParams) -> Callable[[Any, Any], Any]:
    """One Adam step on a batch (a tf.function): returns the batch's loss."""
    import keras
    import tensorflow as tf
    variables = model.variables
    optimizer = keras.optimizers.Adam(learning_rate=params.learning_rate)

    @tf.function(reduce_retracing=True)
    def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            z = tf.math.l2_normalize(model(xb), axis=1)
            loss = supervised_contrastive_loss(z, yb, params.temperature)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return step


def _fit(x: np.ndarray, labels: np.ndarray, params: TrainParams,
         step: Callable[[Any, Any], Any]) -> tuple[list[float], int]:
    """params.epochs passes of seeded batches (gathered from x as they are needed, no copy
    of x is handed to TensorFlow): (mean loss per epoch, steps)."""
    import tensorflow as tf
    rng = np.random.default_rng(params.seed)
    history: list[float] = []
    steps = 0
    for epoch in range(params.epochs):
        losses = []
        for idx in _batches(labels, params, rng):
            if len(idx) < 2:
                continue
            xb = tf.constant(np.asarray(x[idx], np.float32))
            losses.append(float(step(xb, tf.constant(labels[idx]))))
            steps += 1
        history.append(round(float(np.mean(losses)) if losses else 0.0, 5))
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == params.epochs:
            log.info("train-adapter: epoch %d/%d loss %.4f", epoch + 1, params.epochs,
                     history[-1])
    return history, steps


def train_adapter(x: np.ndarray, labels: np.ndarray, params: TrainParams
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on rows `x` [n, in_dim] with product labels [n]; returns (arrays, history).

    Linear (params.hidden 0): {"weights": W [in_dim, out_dim]}, output = x W.
    MLP (hidden H > 0): W plus {"hidden_weights" [in_dim, H], "hidden_bias" [H],
    "output_weights" [H, out_dim]}, output = x W + relu(x W1 + b1) W2: the linear map with
    a non-linear residual that starts at zero (W2 = 0), so training starts from exactly the
    linear adapter's initialisation."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")  # CPU only (the budget)
    except (RuntimeError, ValueError):  # devices already initialised in this process
        pass
    started = time.time()
    tf.random.set_seed(params.seed)
    model = _build_model(x, params)
    history, steps = _fit(x, np.asarray(labels, np.int64), params, _make_step(model, params))
    info = {"loss": LOSS_NAME, "params": params.to_dict(),
            "init": f"top singular vectors (Gram matrix of up to {params.init_sample} rows)",
            "steps": steps, "loss_first_epoch": history[0] if history else None,
            "loss_last_epoch": history[-1] if history else None, "loss_by_epoch": history,
            "seconds": round(time.time() - started, 2)}
    return model.arrays(), info


def train_linear(x: np.ndarray, labels: np.ndarray, params: TrainParams
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """The linear adapter: (W [in_dim, out_dim], history) (`train_adapter`, hidden 0)."""
    arrays, info = train_adapter(x, labels, replace(params, hidden=0))
    return arrays["weights"], info
