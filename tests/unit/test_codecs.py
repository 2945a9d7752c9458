from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.codecs import encode_image

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def photo_like(h=256, w=256, channels=3) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    base = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) * 127 / (h + w))] + [np.full((h, w), 200.0)] * (channels - 3), -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_magic_bytes_and_round_trip(fmt):
    pixels = photo_like()
    data = encode_image(pixels, fmt, 90)
    assert data.startswith(MAGIC[fmt])
    if fmt == "webp":
        assert data[8:12] == b"WEBP"
    img = Image.open(io.BytesIO(data))
    assert img.size == (256, 256)
    if fmt == "png":
        assert np.array_equal(np.asarray(img), pixels)  # lossless


def test_jpeg_compression_trades_size():
    pixels = photo_like()
    assert len(encode_image(pixels, "jpeg", 10)) < len(encode_image(pixels, "jpeg", 95))


def test_webp_compression_trades_size():
    pixels = photo_like()
    assert len(encode_image(pixels, "webp", 10)) < len(encode_image(pixels, "webp", 90))


def test_rgba_png_keeps_alpha():
    pixels = photo_like(channels=4)
    pixels[..., 3] = 17
    img = Image.open(io.BytesIO(encode_image(pixels, "png")))
    assert img.mode == "RGBA" and np.asarray(img)[..., 3].max() == 17


def test_rejects_wrong_dtype_and_format():
    with pytest.raises(ValueError):
        encode_image(np.zeros((8, 8, 3), np.float32), "png")
    with pytest.raises(ValueError):
        encode_image(np.zeros((8, 8, 3), np.uint8), "bmp")


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (64, 48, 4), (300, 200, 3)])
@pytest.mark.parametrize("level", [0, 1, 3])
def test_fast_png_is_valid_and_lossless(shape, level):
    from serve_app.codecs import encode_png

    pixels = np.random.default_rng(sum(shape) + level).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels, level)
    Image.open(io.BytesIO(data)).verify()  # checks chunk CRCs and structure
    img = Image.open(io.BytesIO(data))
    assert img.mode == ("RGBA" if shape[2] == 4 else "RGB")
    assert np.array_equal(np.asarray(img), pixels)


def test_fast_png_compresses_smooth_images():
    from serve_app.codecs import encode_png

    yy, xx = np.mgrid[0:256, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    assert len(encode_png(smooth, 1)) < smooth.nbytes / 10
