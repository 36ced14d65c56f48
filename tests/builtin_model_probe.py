"""Run a builtin model on real photos in a child process and save what it computes.

    python tests/builtin_model_probe.py CACHE_DIR MODEL_NAME OUT.npz [PRECISION]

Converts `builtin:MODEL_NAME` into CACHE_DIR if needed, then saves the embeddings (through
the same Embedder as the pipeline) and the ImageNet logits of the skimage photos named in
PHOTOS. Tests run it as a subprocess so that a native abort inside TensorFlow (e.g. a oneDNN
kernel bug) fails one test with the child's stderr instead of killing the whole test run,
and so that the TF_ENABLE_ONEDNN_OPTS setting can differ per run.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

PHOTOS = ("camera", "chelsea", "coffee", "rocket", "stereo_motorcycle")


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """The pipeline's preprocessing: shorter side -> size / 0.875 (bicubic), center size x size."""
    img = Image.fromarray(rgb).convert("RGB")
    scale = round(size / 0.875) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def photo(name: str, size: int) -> np.ndarray:
    """A skimage sample photo as uint8 RGB [size, size, 3]."""
    import skimage.data
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):      # stereo_motorcycle() -> (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return center_crop(image, size)


def main(cache_dir: str, name: str, out: str, precision: str = "fp32") -> None:
    import tensorflow as tf

    from pipelines.model.precision import apply_precision
    from pipelines.model.resolve import Embedder, resolve_model
    apply_precision(precision)  # model.precision: process-global, before any graph
    spec = resolve_model(f"builtin:{name}", cache_dir)
    batch = np.stack([photo(p, spec.input_size) for p in PHOTOS])
    embeddings = Embedder(spec).embed(batch)
    loaded = tf.saved_model.load(spec.path)
    x = tf.constant((batch.astype(np.float32) - spec.mean) / spec.std)
    logits = loaded.signatures["classify"](images=x)["logits"].numpy()
    np.savez(out, embeddings=embeddings, logits=logits, photos=np.array(PHOTOS),
             input_size=spec.input_size, fingerprint=spec.fingerprint)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(*sys.argv[1:5])
