"""Image encoders: uint8 arrays to PNG / JPEG / WebP bytes, and to SVG by tracing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import simplejpeg
import vtracer
from isal import isal_zlib
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "svg": "image/svg+xml"}


def encode_image(pixels: np.ndarray, output_format: str, compression: int = 100, png_level: int = 1) -> bytes:
    """Encode an HxWx3 (RGB) or HxWx4 (RGBA) uint8 array.

    ``compression`` follows OpenAI's ``output_compression``: 0-100, higher keeps
    more detail (it is the JPEG/WebP quality). PNG is lossless; ``png_level``
    (0-3) is the deflate effort of :func:`encode_png`.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected HxWx3 or HxWx4 uint8 pixels, got {pixels.dtype} {pixels.shape}")
    pixels = np.ascontiguousarray(pixels)
    if output_format == "png":
        return encode_png(pixels, png_level)
    if output_format == "svg":
        return encode_svg(pixels)
    if output_format == "jpeg":
        # libjpeg-turbo through simplejpeg with its fast DCT: ~6.6 ms at
        # 1024x1024 here against ~10 ms for Pillow. 4:2:0 chroma subsampling,
        # as most encoders do by default.
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(pixels[..., :3]), quality=max(1, min(compression, 95)), colorspace="RGB",
            colorsubsampling="420", fastdct=True,
        )
    image = Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "RGB")
    buf = io.BytesIO()
    if output_format == "webp":
        if compression >= 100:
            image.save(buf, format="WEBP", lossless=True, method=0)
        else:
            image.save(buf, format="WEBP", quality=compression, method=2)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buf.getvalue()


def encode_svg(pixels: np.ndarray) -> bytes:
    """The image traced to SVG paths by VTracer (colour mode, spline curves,
    its defaults for illustrations). A diffusion model makes rasters; this is
    how its picture becomes a vector file. Transparent pixels (RGBA) stay
    uncovered. VTracer reads the image from a PNG; level 0 costs nothing to
    deflate."""
    return vtracer.convert_raw_image_to_svg(encode_png(pixels, 0), img_format="png").encode("utf-8")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """A standard 8-bit RGB/RGBA PNG, written with NumPy and ISA-L's deflate.

    Pillow's encoder spends most of its time in zlib (about 300 ms at 1024x1024
    at its default level, 70 ms at level 1 on a 2-core CPU). Here every row
    uses PNG's "Up" filter (the byte-wise difference from the row above, one
    vectorised subtraction) and ISA-L deflates the result several times faster
    than zlib. ``level`` is ISA-L's 0-3 (higher: smaller, slower).
    """
    h, w, c = pixels.shape
    rows = np.empty((h, w * c + 1), np.uint8)
    flat = pixels.reshape(h, w * c)
    rows[:, 0] = 2  # filter type Up
    rows[0, 1:] = flat[0]  # the first row's "row above" is zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # wraps modulo 256, as PNG defines
    idat = isal_zlib.compress(rows, max(0, min(level, 3)))  # reads the array's buffer: no copy of the raw image
    header = struct.pack(">IIBBBBB", w, h, 8, 6 if c == 4 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
