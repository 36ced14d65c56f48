"""Embedding models behind one interface: a handle in, L2-normalised float32 vectors out.

A handle is `builtin:efficientnet_lite0` (ImageNet weights converted by our code into
a SavedModel cached locally on first use), a local SavedModel directory, or a TF Hub
URL (hub.load; works wherever the URL is reachable or cached via TFHUB_CACHE_DIR).

`resolve_model` is cheap and runs in the launcher (it fixes the fingerprint, input
size and preprocessing recorded in snapshots and index manifests); `Embedder` loads
the graph and runs in each worker process, and in serving.

Preprocessing contract: images arrive as uint8 [N, S, S, 3] RGB (see
pipelines.image_decode); the embedder computes (x - mean) / std in float32 and
calls the model; the output is L2-normalised.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("efficientnet_lite0",)
# Written into every SavedModel we produce (and read back for local directories).
METADATA_FILE = "catalog_search_model.json"
# TF Hub image models take float inputs in [0, 1].
HUB_MEAN, HUB_STD = 0.0, 255.0


class ModelError(ValueError):
    """A model handle cannot be resolved or loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything a stage needs to know about a model, without loading TensorFlow graphs."""
    handle: str          # as configured
    path: str            # what to load: a local SavedModel directory or a TF Hub URL
    input_size: int      # square side in pixels
    mean: float          # preprocessing: (x - mean) / std on 0..255 RGB
    std: float
    dim: int             # embedding size (0 = not known until the model is loaded)
    fingerprint: str     # sha256: changes whenever the embeddings would change

    @property
    def name(self) -> str:
        if self.handle.startswith(BUILTIN_PREFIX):
            return self.handle[len(BUILTIN_PREFIX):]
        return os.path.basename(self.handle.rstrip("/")) or "model"

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.fingerprint[:12]}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_id"] = self.model_id
        d["preprocessing"] = {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                              "color": "RGB", "dtype_in": "uint8"}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _hash_dir(path: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def resolve_model(handle: str, cache_dir: str, input_size: int | None = None) -> ModelSpec:
    """Turn a handle into a ModelSpec; converts the builtin model into the cache if needed."""
    if handle.startswith(BUILTIN_PREFIX):
        name = handle[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ModelError(f"unknown builtin model {handle!r}; available: "
                             + ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS))
        from pipelines.efficientnet_lite import ensure_saved_model
        path = ensure_saved_model(cache_dir)
        meta = _read_metadata(path)
        if input_size is not None and input_size != meta["input_size"]:
            raise ModelError(f"{handle} takes {meta['input_size']}px inputs; "
                             f"model.input_size={input_size} is not supported")
        return ModelSpec(handle=handle, path=path, input_size=int(meta["input_size"]),
                         mean=float(meta["mean"]), std=float(meta["std"]),
                         dim=int(meta["dim"]), fingerprint=meta["fingerprint"])
    if handle.startswith(("http://", "https://")):
        size = input_size or 224
        fp = hashlib.sha256(f"{handle}|{size}".encode()).hexdigest()
        return ModelSpec(handle=handle, path=handle, input_size=size, mean=HUB_MEAN, std=HUB_STD,
                         dim=0, fingerprint=fp)
    path = os.path.abspath(os.path.expanduser(handle))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ModelError(f"model handle {handle!r} is neither a builtin:NAME, an http(s) TF Hub "
                         f"URL, nor a local SavedModel directory (no saved_model.pb in {path})")
    meta = _read_metadata(path, required=False) or {}
    size = input_size or int(meta.get("input_size", 224))
    mean = float(meta.get("mean", HUB_MEAN))
    std = float(meta.get("std", HUB_STD))
    fp = hashlib.sha256(f"{_hash_dir(path)}|{size}|{mean}|{std}".encode()).hexdigest()
    return ModelSpec(handle=handle, path=path, input_size=size, mean=mean, std=std,
                     dim=int(meta.get("dim", 0)), fingerprint=fp)


def _read_metadata(path: str, required: bool = True) -> dict[str, Any] | None:
    meta_path = os.path.join(path, "assets", METADATA_FILE)
    if not os.path.exists(meta_path):
        if required:
            raise ModelError(f"{path} lacks assets/{METADATA_FILE}")
        return None
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def configure_tf_threads(threads: int) -> None:
    """Limit TF's thread pools (0 = TF default). Must run before TF executes any op."""
    if threads <= 0:
        return
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF already initialised in this process: keep its settings


class Embedder:
    """Loaded model: `embed(uint8 [N,S,S,3]) -> float32 [N,dim]`, L2-normalised."""

    def __init__(self, spec: ModelSpec):
        import tensorflow as tf
        self.spec = spec
        if spec.path.startswith(("http://", "https://")):
            import tensorflow_hub as hub
            obj = hub.load(spec.path)
        else:
            obj = tf.saved_model.load(spec.path)
        self._module = obj
        sig = getattr(obj, "signatures", {}) or {}
        if "serving_default" in sig and not callable(getattr(obj, "__call__", None)):
            fn = sig["serving_default"]
            self._call = lambda x: next(iter(fn(x).values()))
        elif callable(obj):
            self._call = obj
        elif "serving_default" in sig:
            fn = sig["serving_default"]
            self._call = lambda x: next(iter(fn(x).values()))
        else:
            raise ModelError(f"{spec.handle}: SavedModel is neither callable nor has serving_default")
        mean, std = np.float32(spec.mean), np.float32(spec.std)

        @tf.function(reduce_retracing=True)
        def _embed(images):
            x = (tf.cast(images, tf.float32) - mean) / std
            y = self._call(x)
            if isinstance(y, dict):
                y = y.get("embedding", next(iter(y.values())))
            y = tf.reshape(tf.cast(y, tf.float32), [tf.shape(images)[0], -1])
            return tf.math.l2_normalize(y, axis=1)

        self._embed = _embed

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N,H,W,3] images, got shape {images.shape}")
        s = self.spec.input_size
        if images.shape[1:3] != (s, s):
            raise ValueError(f"expected {s}x{s} images for {self.spec.handle}, "
                             f"got {images.shape[1]}x{images.shape[2]}")
        return self._embed(images).numpy()
