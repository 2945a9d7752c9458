"""Image encoders: uint8 arrays to PNG / JPEG / WebP bytes with Pillow."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(pixels: np.ndarray, output_format: str, compression: int = 100, png_level: int = 1) -> bytes:
    """Encode an HxWx3 (RGB) or HxWx4 (RGBA) uint8 array.

    ``compression`` follows OpenAI's ``output_compression``: 0-100, higher keeps
    more detail (it is the JPEG/WebP quality). PNG is lossless; ``png_level`` is
    the zlib effort, 1 by default because level 6 costs ~4x the time at 1024x1024
    for a few percent of size.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected HxWx3 or HxWx4 uint8 pixels, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "RGB")
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=png_level)
    elif output_format == "jpeg":
        if image.mode == "RGBA":
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=max(1, min(compression, 95)), subsampling=2 if compression < 90 else 0)
    elif output_format == "webp":
        if compression >= 100:
            image.save(buf, format="WEBP", lossless=True, method=0)
        else:
            image.save(buf, format="WEBP", quality=compression, method=2)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buf.getvalue()
