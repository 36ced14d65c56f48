"""decode_image / preprocess / augment_view on real generated files, bad ones included."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import image_factory as f
from pipelines.model.image_decode import DecodeError, augment_view, decode_image, preprocess

LIMIT = 40_000_000


def test_plain_jpeg_decodes_to_rgb():
    img = decode_image(f.jpeg_bytes(), max_pixels=LIMIT)
    assert img.mode == "RGB" and img.size == (120, 80)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not_an_image"),
    (f.truncated_jpeg(), "truncated"),
    (f.decompression_bomb_png(), "too_many_pixels"),
])
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError) as e:
        decode_image(data, max_pixels=LIMIT)
    assert e.value.reason == reason
    assert str(e.value)


def test_byte_limit():
    with pytest.raises(DecodeError) as e:
        decode_image(f.jpeg_bytes(), max_pixels=LIMIT, max_bytes=100)
    assert e.value.reason == "too_large"


def test_pixel_limit_below_the_bomb_threshold_is_configurable():
    with pytest.raises(DecodeError) as e:
        decode_image(f.jpeg_bytes(size=(120, 80)), max_pixels=120 * 80 - 1)
    assert e.value.reason == "too_many_pixels"


def test_cmyk_jpeg_becomes_rgb_red():
    img = decode_image(f.cmyk_jpeg(), max_pixels=LIMIT)
    r, g, b = img.getpixel((10, 10))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped():
    img = decode_image(f.png16_bytes(), max_pixels=LIMIT)
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert arr.min() <= 5 and arr.max() >= 250  # full range kept, not saturated at 255


def test_palette_transparency_is_composited_on_white():
    img = decode_image(f.palette_transparent_png(), max_pixels=LIMIT)
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((30, 5)) == (0, 200, 0)


def test_exif_orientation_is_applied():
    img = decode_image(f.exif_rotated_jpeg(), max_pixels=LIMIT)
    assert img.size == (40, 80)  # rotated from 80x40
    top, bottom = img.getpixel((20, 5)), img.getpixel((20, 75))
    assert top[0] > 150 and bottom[2] > 150  # red on top, blue below after 90° CW


def test_draft_decoding_gives_nearly_the_same_model_input():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (125, 125, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((1000, 1000), Image.BICUBIC)
    import io
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    fast = decode_image(data, max_pixels=LIMIT, target_size=64)
    full = decode_image(data, max_pixels=LIMIT)
    assert fast.size[0] < 1000  # the DCT-domain downscale happened
    a, b = preprocess(fast, 64), preprocess(full, 64)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6


@pytest.mark.parametrize("mode", ["center_crop", "pad"])
def test_preprocess_shape_and_dtype(mode):
    arr = preprocess(Image.new("RGB", (300, 100), (10, 20, 30)), 64, mode)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    if mode == "pad":
        assert tuple(arr[0, 0]) == (255, 255, 255)  # letterbox is white
    else:
        assert tuple(arr[0, 0]) == (10, 20, 30)


def _preprocess_views(img, views, *, size, resize, image_id, seed):
    """[(view name, uint8 [size,size,3])] for each view (augment_view, then preprocess)."""
    return [(v, preprocess(augment_view(img, v, image_id=image_id, seed=seed), size, resize))
            for v in views]


def test_augment_views_are_deterministic_per_image_id():
    img = decode_image(f.jpeg_bytes(size=(200, 160)), max_pixels=LIMIT)
    views = ["original", "hflip", "crop", "rotate", "jitter"]
    a = _preprocess_views(img, views, size=64, resize="center_crop", image_id="x", seed=0)
    b = _preprocess_views(img, views, size=64, resize="center_crop", image_id="x", seed=0)
    c = _preprocess_views(img, views, size=64, resize="center_crop", image_id="y", seed=0)
    assert [v for v, _ in a] == views
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert not np.array_equal(a[2][1], c[2][1])  # the crop depends on the image_id
    flipped = np.asarray(augment_view(img, "hflip", image_id="x", seed=0))
    assert np.array_equal(flipped, np.asarray(img)[:, ::-1])
