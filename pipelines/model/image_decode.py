"""Decode, preprocess and augment images: the ONE implementation used by the embed
pipeline and by serving, so a query photo is treated exactly like a catalog image.

decode_image:   bytes -> RGB PIL image (JPEG DCT-domain downscale via Image.draft,
                EXIF orientation, any mode -> RGB with alpha composited on white,
                byte/pixel limits, truncated files refused)
augment_views:  deterministic views (seeded by image_id) for embedding augmentation
preprocess:     PIL image -> uint8 [S, S, 3] (center crop or letterbox), model input
"""
from __future__ import annotations

import hashlib
import io
import random
import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps
from pipelines.core.errors import BadInputError

if TYPE_CHECKING:
    from pipelines.core.config import Config

# Refuse truncated files instead of silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The fraction of the shorter side kept by the center crop (the ImageNet convention:
# resize to 256, crop 224).
CENTER_CROP_FRACTION = 0.875
_WHITE = (255, 255, 255)


class DecodeError(BadInputError):
    """An image cannot be decoded; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Formats accepted for query uploads (serving): the common photo formats, decoded by
# Pillow's own code; nothing that hands the bytes to an external program (EPS, PDF...).
QUERY_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG covers MPO


def decode_image(data: bytes, *, max_pixels: int, target_size: int | None = None,
                 max_bytes: int | None = None, max_decoded_pixels: int | None = None,
                 formats: Sequence[str] | None = None) -> Image.Image:
    """Decode bytes into an RGB image.

    With `target_size`, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    whose result still covers target_size / CENTER_CROP_FRACTION on its shorter side,
    which is several times faster than a full decode and loses nothing the model sees.
    `max_pixels` limits the size the file declares; `max_decoded_pixels` (a tighter limit
    for untrusted uploads) limits the pixels actually decoded into memory, i.e. after the
    JPEG draft reduction, and is checked before any pixel data is decoded. `formats`
    restricts the accepted Pillow formats (default: any Pillow can open).
    Raises DecodeError with reason: empty, too_large, not_an_image, too_many_pixels,
    truncated, corrupt.
    """
    if not data:
        raise DecodeError("empty", "zero bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes is more than the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data),
                                          formats=list(formats) if formats else None)
    except Image.DecompressionBombError as e:
        raise DecodeError("too_many_pixels", str(e)) from e
    except Image.DecompressionBombWarning as e:
        raise DecodeError("too_many_pixels", str(e)) from e
    except Image.UnidentifiedImageError as e:  # its text names the BytesIO object
        accepted = f"the accepted formats ({', '.join(formats)})" if formats \
            else "the image formats Pillow reads"
        raise DecodeError("not_an_image", f"not a decodable image: {len(data)} bytes in none "
                          f"of {accepted}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError...
        raise DecodeError("not_an_image", f"not a decodable image: {e}") from e
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("corrupt", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError("too_many_pixels",
                          f"{w}x{h} = {w * h} pixels is more than the limit of {max_pixels}")
    try:
        if target_size and img.format == "JPEG":
            need = int(round(target_size / CENTER_CROP_FRACTION))
            # draft() picks the largest reduction whose size is still >= the request.
            scale = min(w, h) / need
            if scale >= 2:
                img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        if max_decoded_pixels is not None:
            dw, dh = img.size  # after draft: what load() will allocate
            if dw * dh > max_decoded_pixels:
                raise DecodeError(
                    "too_many_pixels",
                    f"{w}x{h} {img.format or 'image'} decodes to {dw}x{dh} = {dw * dh} pixels, "
                    f"more than the limit of {max_decoded_pixels} for this input")
        img.load()
    except DecodeError:
        raise
    except OSError as e:
        text = str(e)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise DecodeError(reason, f"cannot decode {img.format or 'image'}: {text}") from e
    except Exception as e:
        raise DecodeError("corrupt", f"cannot decode {img.format or 'image'}: {e}") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block is not worth losing the image for
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency composited on white; 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK (Adobe-inverted CMYK is handled by Pillow), YCbCr...


def _view_rng(seed: int, image_id: str, view: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{image_id}|{view}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def augment_view(img: Image.Image, view: str, *, image_id: str, seed: int) -> Image.Image:
    """One augmentation view; random parameters are a pure function of (seed, image_id, view)."""
    if view == "original":
        return img
    rng = _view_rng(seed, image_id, view)
    if view == "hflip":
        return ImageOps.mirror(img)
    if view == "crop":
        w, h = img.size
        frac = rng.uniform(0.75, 0.9)
        cw, ch = max(1, int(w * frac)), max(1, int(h * frac))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return img.crop((x, y, x + cw, y + ch))
    if view == "rotate":
        return img.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, expand=False,
                          fillcolor=_WHITE)
    if view == "jitter":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    raise ValueError(f"unknown augmentation view {view!r}")


def preprocess(img: Image.Image, size: int, resize: str = "center_crop") -> np.ndarray:
    """RGB image -> uint8 [size, size, 3] model input.

    center_crop: resize the shorter side to size / 0.875, crop the center size x size.
    pad: fit the whole image inside size x size, letterboxed on white.
    """
    w, h = img.size
    if resize == "center_crop":
        short = int(round(size / CENTER_CROP_FRACTION))
        scale = short / min(w, h)
        nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        fitted = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        img = Image.new("RGB", (size, size), _WHITE)
        img.paste(fitted, ((size - nw) // 2, (size - nh) // 2))
    else:
        raise ValueError(f"unknown resize mode {resize!r} (center_crop or pad)")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise DecodeError("corrupt", f"preprocessed array has shape {arr.shape}")
    return arr


def load_and_preprocess(data: bytes, size: int, config: "Config", *,
                        max_decoded_pixels: int | None = None,
                        formats: Sequence[str] | None = None) -> np.ndarray:
    """bytes -> uint8 [size,size,3] exactly as the pipeline's 'original' view (for serving).

    Serving passes `max_decoded_pixels=config.serving.max_query_pixels` and
    `formats=QUERY_FORMATS` for uploads (see decode_image).
    """
    img = decode_image(data, max_pixels=config.decode.max_pixels, target_size=size,
                       max_bytes=config.fetch.max_bytes, max_decoded_pixels=max_decoded_pixels,
                       formats=formats)
    return preprocess(img, size, config.decode.resize)
