"""Reading the images and masks clients send, before any stage sees them.

Every refusal is a 400 naming the parameter the client sent (``image``,
``image[]``, ``mask``, ``images[0].image_url``): an upload can be anything,
and nothing in it may become a 500 or a decode the server cannot afford.

The order of checks is the point of this module:
1. the byte size, before anything else looks at the data;
2. the format, from the file's magic bytes (never its name or declared type),
   and Pillow is then told to try only that format's plugin;
3. the declared width x height against the pixel limit, with the image opened
   lazily (``Image.open`` reads the header only), so a decompression bomb is
   refused before its pixel data is decoded;
4. animation, then the full decode, where truncated or corrupt data fails;
5. conversion to the RGB or RGBA uint8 array the stages take.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from serve_app.errors import OpenAIError, invalid_request

logger = logging.getLogger("serve_app")

DEFAULT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_MAX_BYTES = 50 << 20
DEFAULT_MAX_PIXELS = 4096 * 4096

# OpenAI's masks are PNGs; JPEG is let through the format check only so that a
# JPEG mask is told what is actually wrong with it (it cannot carry alpha).
_MASK_FORMATS = ("png", "webp", "jpeg")

# Our format name -> (magic-byte test, Pillow's plugin name). Formats we know
# but never decode (HEIC, AVIF) are listed so that the refusal can name them.
_SIGNATURES: dict[str, tuple[object, str | None]] = {
    "png": (lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), "PNG"),
    "jpeg": (lambda b: b.startswith(b"\xff\xd8\xff"), "JPEG"),
    "gif": (lambda b: b[:6] in (b"GIF87a", b"GIF89a"), "GIF"),
    "webp": (lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP", "WEBP"),
    "bmp": (lambda b: b.startswith(b"BM"), "BMP"),
    "tiff": (lambda b: b[:4] in (b"II*\x00", b"MM\x00*"), "TIFF"),
    "heic": (lambda b: b[4:8] == b"ftyp" and b[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"), None),
    "avif": (lambda b: b[4:8] == b"ftyp" and b[8:12] in (b"avif", b"avis"), None),
}

# Pillow refuses an image past 2 x MAX_IMAGE_PIXELS when it opens it. That
# limit is process-wide, so it is not lowered to ours (max_pixels is per call
# and checked in _open); it is only re-armed, at Pillow's own default, if some
# library switched it off, so that it stays a second line behind ours.
if Image.MAX_IMAGE_PIXELS is None:
    Image.MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Modes Pillow cannot convert to 8-bit without clipping (I;16 -> L keeps
# values up to 255 and clips the rest): scaled here instead.
_WIDE_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class InputImage:
    """A decoded client image, upright (EXIF orientation applied), as the stages take it."""

    pixels: np.ndarray  # HxWx3 uint8 RGB, or HxWx4 uint8 RGBA when the file has any transparency
    format: str  # as identified by its magic bytes: "png", "jpeg", "webp", "gif", ...
    nbytes: int  # size of the encoded file

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] == 4


def read_image(
    data: bytes,
    param: str,
    *,
    formats: Collection[str] = DEFAULT_FORMATS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> InputImage:
    """Decode an uploaded image, or raise a 400 naming ``param``."""
    fmt, img = _open(data, param, formats, max_bytes, max_pixels)
    with img:
        pixels = _to_array(img, param)
    return InputImage(pixels=pixels, format=fmt, nbytes=len(data))


def read_mask(
    data: bytes,
    param: str,
    *,
    size: tuple[int, int],
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The mask's alpha plane, HxW uint8: 0 marks where to edit, 255 what to keep (OpenAI's meaning).

    ``size`` is the image's (width, height); the mask must match it exactly.
    """
    fmt, img = _open(data, param, _MASK_FORMATS, max_bytes, max_pixels)
    with img:
        if not _has_alpha(img):
            why = "JPEG cannot carry one" if fmt == "jpeg" else f"its colour mode is {img.mode}"
            raise invalid_request(
                f"Invalid mask for '{param}': the mask has no alpha channel ({why}). The mask must be a PNG "
                "with an alpha channel (RGBA, LA, or a palette or greyscale image with transparency): fully "
                "transparent pixels (alpha 0) mark where the image is edited.",
                param,
                "invalid_mask_image_format",
            )
        pixels = _to_array(img, param)
    height, width = pixels.shape[:2]
    if (width, height) != tuple(size):
        raise invalid_request(
            f"Invalid mask for '{param}': the mask is {width}x{height} pixels but the image is "
            f"{size[0]}x{size[1]}; they must be the same size.",
            param,
            "invalid_mask_size",
        )
    return np.ascontiguousarray(pixels[:, :, 3])


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


def decode_reference(value: str, param: str) -> bytes | str:
    """A client's image reference: a data URL or bare base64 -> its bytes; an
    http(s) URL -> returned as given, for the caller to fetch (ImageFetcher).

    The bytes are not looked at here: read_image identifies them, so a data
    URL's declared media type (image/png, image/jpeg, ...) is not trusted either.
    """
    if not isinstance(value, str):
        raise invalid_request(f"Invalid '{param}': expected a string.", param, "invalid_image_url")
    # Base64 has no ':' in its alphabet, so a leading "word:" can only be a URL scheme.
    scheme = _SCHEME_RE.match(value.lstrip())
    if scheme is None:
        return _b64decode(value, param, what="base64 text")
    name = scheme.group(1).lower()
    if name in ("http", "https"):
        return value
    if name == "data":
        return _decode_data_url(value.lstrip(), param)
    raise invalid_request(
        f"Invalid '{param}': the URL scheme '{name}:' is not supported. Send the image as a data URL "
        "(data:image/png;base64,...), as base64 text, or as an http(s) URL.",
        param,
        "invalid_image_url",
    )


def _decode_data_url(url: str, param: str) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    # RFC 2397: data:[<mediatype>][;parameter=value]*[;base64],<data>
    if not comma or header.rsplit(";", 1)[-1].strip().lower() != "base64":
        raise invalid_request(
            f"Invalid '{param}': a data URL must be base64-encoded, e.g. data:image/png;base64,iVBORw0KGgo...",
            param,
            "invalid_image_url",
        )
    return _b64decode(payload, param, what="the data URL's base64 payload")


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def _b64decode(text: str, param: str, *, what: str) -> bytes:
    """Standard or URL-safe alphabet, padding optional, whitespace (line breaks) ignored."""
    compact = "".join(text.split()).rstrip("=").translate(_URLSAFE_TO_STANDARD)
    # One leftover character cannot encode a byte: no padding makes that valid.
    if compact and len(compact) % 4 != 1:
        try:
            return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise invalid_request(
        f"Invalid '{param}': {what} is {'empty' if not compact else 'not valid base64'}. An image must be sent "
        "as a data URL (data:image/png;base64,...), as base64 text, or as an http(s) URL.",
        param,
        "invalid_base64",
    )


def _identify(data: bytes) -> str | None:
    head = bytes(data[:16])
    return next((name for name, (test, _) in _SIGNATURES.items() if test(head)), None)


def _format_list(formats: Collection[str]) -> str:
    return ", ".join(f.upper() for f in formats)


def _open(
    data: bytes, param: str, formats: Collection[str], max_bytes: int, max_pixels: int
) -> tuple[str, Image.Image]:
    """Checks 1-4 of the module docstring; returns the identified format and the loaded image."""
    unknown = [f for f in formats if _SIGNATURES.get(f, (None, None))[1] is None]
    if unknown:
        raise ValueError(f"formats {unknown} cannot be decoded; known: {[n for n, s in _SIGNATURES.items() if s[1]]}")
    if len(data) > max_bytes:
        raise invalid_request(
            f"Invalid '{param}': the file is {len(data)} bytes; the limit is {max_bytes} bytes "
            f"({max_bytes / (1 << 20):g} MiB).",
            param,
            "image_too_large",
        )
    fmt = _identify(data)
    if fmt not in formats:
        found = "is not an image" if fmt is None else f"is a {fmt.upper()} image"
        raise invalid_request(
            f"Invalid '{param}': the file {found}. Supported formats: {_format_list(formats)}.",
            param,
            "invalid_image_format",
        )
    # A process-wide switch that would make truncated files decode as if whole
    # (the missing part grey). This module must never run with it on.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode client images with it on")

    try:
        # Reads the header only; formats= keeps Pillow from trying every plugin it has.
        img = Image.open(io.BytesIO(data), formats=[_SIGNATURES[fmt][1]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own (process-wide) limit fired first: same refusal as ours.
        raise _too_many_pixels(param, None, max_pixels) from None
    except Exception as exc:  # any parser error on untrusted bytes is the client's 400
        raise _unreadable(param, fmt, exc) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise _unreadable(param, fmt, ValueError("empty image"))
        if width * height > max_pixels:
            raise _too_many_pixels(param, (width, height), max_pixels)
        # Checked before load(). is_animated stops at the second frame, where
        # n_frames would walk them all (a GIF can hold thousands); only a plugin
        # without is_animated is asked for n_frames.
        animated = getattr(img, "is_animated", None)
        if animated is None:
            animated = getattr(img, "n_frames", 1) > 1
        if animated:
            raise invalid_request(
                f"Invalid '{param}': the {fmt.upper()} image is animated. Send a still image (one frame).",
                param,
                "invalid_image",
            )
        img.load()
    except OpenAIError:
        img.close()
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        img.close()
        raise _too_many_pixels(param, None, max_pixels) from None
    except Exception as exc:
        img.close()
        raise _unreadable(param, fmt, exc) from None
    return fmt, img


def _too_many_pixels(param: str, size: tuple[int, int] | None, max_pixels: int) -> OpenAIError:
    # size is None when Pillow's own, higher, limit refused the header first.
    declared = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "far more pixels than that"
    return invalid_request(
        f"Invalid '{param}': the image may have at most {max_pixels} pixels "
        f"(e.g. {int(max_pixels**0.5)}x{int(max_pixels**0.5)}), and it declares {declared}.",
        param,
        "image_too_large",
    )


def _unreadable(param: str, fmt: str, exc: BaseException) -> OpenAIError:
    # The parser's own text stays in the log: it can be long, odd, or name internals.
    logger.info("client image %r unreadable as %s: %s: %s", param, fmt, type(exc).__name__, exc)
    return invalid_request(
        f"Invalid '{param}': the {fmt.upper()} file could not be decoded; it is truncated or corrupt.",
        param,
        "invalid_image",
    )


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _to_array(img: Image.Image, param: str) -> np.ndarray:
    """The loaded image, upright, as HxWx3 RGB or (with any transparency) HxWx4 RGBA uint8."""
    try:
        img = _upright(img)
        alpha = _has_alpha(img)
        if img.mode in _WIDE_GREY_MODES:
            return _wide_grey(img, alpha)
        if img.mode == "F":
            img = img.convert("I")  # float greyscale (TIFF): rounded, then scaled like 16-bit
            return _wide_grey(img, alpha)
        # Pillow applies tRNS / palette transparency itself when converting to RGBA;
        # CMYK (Adobe's inverted JPEGs included) and YCbCr convert to RGB the same way.
        return np.asarray(img.convert("RGBA" if alpha else "RGB"))
    except Exception as exc:
        logger.info("client image %r: no conversion from mode %s: %s: %s", param, img.mode, type(exc).__name__, exc)
        raise invalid_request(
            f"Invalid '{param}': images in colour mode {img.mode} are not supported; send RGB, RGBA, "
            "greyscale, palette or CMYK images.",
            param,
            "invalid_image",
        ) from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation, as browsers and viewers do when showing the file.

    Done for every format (PNG and WebP carry EXIF too) and for masks alike, so
    that an image and a mask drawn over it as the client saw them stay aligned.
    A malformed EXIF block leaves the image as stored rather than refusing it.
    """
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _wide_grey(img: Image.Image, alpha: bool) -> np.ndarray:
    values = np.asarray(img)
    # 16-bit samples keep their top 8 bits: 65535 -> 255, 32768 -> 128.
    grey = (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    channels = [grey, grey, grey]
    if alpha:
        # A wide greyscale PNG's only transparency is tRNS: one sample value that is transparent.
        transparent = img.info.get("transparency")
        channels.append(np.where(values == transparent, 0, 255).astype(np.uint8))
    return np.stack(channels, axis=-1)
