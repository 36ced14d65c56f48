"""Real image files for bad-input tests, generated in code (no downloaded data)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def jpeg_bytes(size=(120, 80), color=(200, 30, 30), quality=90) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))  # right half blue
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(buf, "JPEG")  # red in CMYK
    return buf.getvalue()


def png16_bytes() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # uint16 -> mode I;16
    return buf.getvalue()


def palette_transparent_png() -> bytes:
    """Palette image: index 0 fully transparent (should become white), index 1 green."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (20, 0, 40, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 80x40 (left red, right blue) with EXIF orientation 6 (display rotated 90° CW)."""
    img = Image.new("RGB", (80, 40), (220, 0, 0))
    img.paste((0, 0, 220), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def decompression_bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny valid-looking PNG whose header declares width x height pixels."""
    small = io.BytesIO()
    Image.new("1", (8, 8)).save(small, "PNG")
    data = bytearray(small.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)
