"""The duplicates job's pixel check: signatures of an image's pixels and their similarity.

A signature is RGB thumbnails of four centred crops; two images are compared by the best
correlation of one's centred 32x32 windows with the other's windows shifted by up to 2
pixels (zero-mean, unit-norm), both ways. Re-encoded, resized and lightly cropped copies
keep their pixels; a distinct look-alike product (same shape, other colours or label)
does not. Used by pipelines.duplicates.pairs.VerifyPairs.
"""
from __future__ import annotations

import numpy as np

# Signature: centred crops (fraction of each side kept), compared at SIZE x SIZE pixels
# within a CONTEXT x CONTEXT thumbnail (so shifts of up to 2 pixels are searched).
SIGNATURE_CROPS = (1.0, 0.94, 0.88, 0.82)
SIGNATURE_SIZE = 32
SIGNATURE_CONTEXT = 36


def pixel_signature(data: bytes, max_pixels: int) -> np.ndarray:
    """float32 [len(SIGNATURE_CROPS), CONTEXT, CONTEXT, 3]: RGB thumbnails of centred
    crops (the project's decoder; DecodeError for bad bytes)."""
    from PIL import Image

    from pipelines.model.image_decode import decode_image
    img = decode_image(data, max_pixels=max_pixels, target_size=4 * SIGNATURE_SIZE)
    w, h = img.size
    out = np.zeros((len(SIGNATURE_CROPS), SIGNATURE_CONTEXT, SIGNATURE_CONTEXT, 3), np.float32)
    for i, frac in enumerate(SIGNATURE_CROPS):
        cw, ch = max(1, int(round(w * frac))), max(1, int(round(h * frac)))
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = img.crop((left, top, left + cw, top + ch)).resize(
            (SIGNATURE_CONTEXT, SIGNATURE_CONTEXT), Image.Resampling.BILINEAR)
        out[i] = np.asarray(crop, np.float32)
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-6)


def _centres(sig: np.ndarray) -> np.ndarray:
    m = (SIGNATURE_CONTEXT - SIGNATURE_SIZE) // 2
    return _unit_rows(sig[:, m:m + SIGNATURE_SIZE, m:m + SIGNATURE_SIZE].reshape(len(sig), -1))


def _windows(sig: np.ndarray) -> np.ndarray:
    view = np.lib.stride_tricks.sliding_window_view(
        sig, (SIGNATURE_SIZE, SIGNATURE_SIZE), axis=(1, 2))  # [c, dy, dx, 3, S, S]
    view = view.transpose(0, 1, 2, 4, 5, 3)                  # [c, dy, dx, S, S, 3]
    return _unit_rows(np.ascontiguousarray(view).reshape(-1, 3 * SIGNATURE_SIZE ** 2))


def pixel_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation (-1..1) between a centred crop of one image and any crop of the
    other shifted by up to (CONTEXT - SIZE) / 2 pixels of the thumbnail, both ways."""
    return float(max(np.max(_centres(a) @ _windows(b).T), np.max(_centres(b) @ _windows(a).T)))
