"""serve_app.image_inputs: what client images and masks are accepted, converted to, or refused with."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from serve_app.errors import OpenAIError
from serve_app.image_inputs import decode_reference, read_image, read_mask


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: for what Pillow cannot save (16-bit RGB) or must never be asked to
    decode (a bomb's header, whose few data bytes are far from its declared size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 64 if rows is None else rows))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")


def refusal(fn, *args, **kwargs) -> dict:
    """The error body of a refusal, which must be a 400 in OpenAI's shape."""
    with pytest.raises(OpenAIError) as info:
        fn(*args, **kwargs)
    assert info.value.status == 400
    error = info.value.body()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] in error["message"]
    return error


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# Identification and the byte limit


def test_png_is_read_as_rgb_with_its_exact_pixels():
    pixels = noise(7, 5)
    data = encode(Image.fromarray(pixels))
    got = read_image(data, "image")
    assert (got.format, got.nbytes, got.width, got.height, got.has_alpha) == ("png", len(data), 7, 5, False)
    assert got.pixels.dtype == np.uint8 and got.pixels.shape == (5, 7, 3)
    np.testing.assert_array_equal(got.pixels, pixels)


def test_rgba_png_keeps_its_alpha():
    pixels = noise(4, 3, 4)
    got = read_image(encode(Image.fromarray(pixels, "RGBA")), "image")
    assert got.has_alpha and got.pixels.shape == (3, 4, 4)
    np.testing.assert_array_equal(got.pixels, pixels)


@pytest.mark.parametrize("fmt, name", [("JPEG", "jpeg"), ("WEBP", "webp")])
def test_jpeg_and_webp_are_identified_by_their_bytes(fmt, name):
    got = read_image(encode(Image.new("RGB", (16, 8), (200, 100, 50)), fmt, quality=95), "image[]")
    assert got.format == name and (got.width, got.height) == (16, 8)
    assert np.abs(got.pixels.astype(int) - [200, 100, 50]).max() <= 4


@pytest.mark.parametrize(
    "data, found",
    [
        (b"", "is not an image"),
        (b"hello, world" * 10, "is not an image"),
        (b"%PDF-1.7\n" + b"0" * 100, "is not an image"),
        (b"\x00\x00\x00\x18ftypheic" + b"\0" * 64, "is a HEIC image"),
    ],
)
def test_not_an_image_is_refused_naming_the_allowed_formats(data, found):
    error = refusal(read_image, data, "image")
    assert error["param"] == "image" and error["code"] == "invalid_image_format"
    assert found in error["message"] and "PNG, JPEG, WEBP" in error["message"]


def test_a_format_outside_formats_is_refused_even_when_pillow_could_read_it():
    gif = encode(Image.new("P", (4, 4)), "GIF")
    error = refusal(read_image, gif, "image")
    assert error["code"] == "invalid_image_format" and "is a GIF image" in error["message"]
    assert read_image(gif, "image", formats=("png", "gif")).format == "gif"
    png = encode(Image.new("RGB", (4, 4)))
    assert refusal(read_image, png, "image", formats=("jpeg",))["message"].endswith("Supported formats: JPEG.")


def test_a_png_named_or_typed_as_jpeg_is_still_a_png():
    # Only bytes reach read_image: the filename and declared type are not even inputs.
    png = encode(Image.new("RGB", (4, 4)))
    ref = decode_reference("data:image/jpeg;base64," + base64.b64encode(png).decode(), "image")
    assert read_image(ref, "image").format == "png"


def test_over_max_bytes_is_refused_before_anything_is_decoded():
    # Garbage: had the format been looked at first, this would be invalid_image_format.
    error = refusal(read_image, b"\x89PNG garbage" + b"\0" * 2000, "image[]", max_bytes=1000)
    assert error["param"] == "image[]" and error["code"] == "image_too_large"
    assert "1000 bytes" in error["message"]


# Decompression bombs


@pytest.fixture
def load_spy(monkeypatch):
    """Records every pixel decode (ImageFile.load), to prove that a refusal came before one."""
    calls = []
    original = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


@pytest.mark.parametrize("side", [100_000, 5000])
def test_a_bomb_header_is_refused_fast_without_decoding(side, load_spy):
    # 100000^2 is past even Pillow's own limit; 5000^2 = 25M pixels passes
    # Pillow's and only our max_pixels (4096^2) stops it.
    bomb = raw_png(side, side, 8, 2, rows=None)
    assert len(bomb) < 200
    started = time.monotonic()
    error = refusal(read_image, bomb, "image")
    assert time.monotonic() - started < 0.5
    assert error["code"] == "image_too_large" and error["param"] == "image"
    assert load_spy == []
    if side == 5000:
        assert "5000x5000" in error["message"] and str(4096 * 4096) in error["message"]


def test_max_pixels_is_the_callers(load_spy):
    data = encode(Image.new("RGB", (64, 64)))
    assert refusal(read_image, data, "image", max_pixels=64 * 63)["code"] == "image_too_large"
    assert load_spy == []
    assert read_image(data, "image", max_pixels=64 * 64).width == 64


def test_a_mask_bomb_is_refused_too(load_spy):
    error = refusal(read_mask, raw_png(50_000, 50_000, 8, 6, rows=None), "mask", size=(64, 64))
    assert error["param"] == "mask" and error["code"] == "image_too_large" and load_spy == []


# Animated, truncated, corrupt


def _frames(mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_animated_images_are_refused(fmt):
    first, *rest = _frames()
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)
    error = refusal(read_image, data, "image", formats=("png", "gif", "webp"))
    assert error["code"] == "invalid_image" and "animated" in error["message"]
    # The same file with one frame is fine.
    assert read_image(encode(first, fmt), "image", formats=("png", "gif", "webp")).width == 8


def test_truncated_png_is_refused():
    data = encode(Image.fromarray(noise(64, 64)))
    error = refusal(read_image, data[: len(data) * 2 // 3], "image")
    assert error["code"] == "invalid_image" and "truncated or corrupt" in error["message"]


def test_truncated_jpeg_is_refused():
    data = encode(Image.fromarray(noise(256, 256)), "JPEG", quality=90)
    assert refusal(read_image, data[: len(data) // 2], "image")["code"] == "invalid_image"


def test_corrupt_png_data_is_refused_without_the_parsers_text():
    data = bytearray(encode(Image.fromarray(noise(64, 64))))
    start = data.index(b"IDAT") + 20
    data[start : start + 64] = bytes(64)  # inside the deflate stream
    error = refusal(read_image, bytes(data), "image")
    assert error["code"] == "invalid_image"
    assert error["message"] == "Invalid 'image': the PNG file could not be decoded; it is truncated or corrupt."


def test_garbage_after_a_png_signature_is_a_400_not_a_500():
    assert refusal(read_image, b"\x89PNG\r\n\x1a\n" + b"\xff" * 40, "image")["code"] == "invalid_image"


def test_it_never_decodes_with_load_truncated_images_on(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_image(encode(Image.new("RGB", (4, 4))), "image")


# Conversions


def test_16_bit_rgb_png_keeps_the_high_byte():
    samples = np.array([[[0x1234, 0x8000, 0xFFFF], [0x00FF, 0x0100, 0x7FFF]]], dtype=">u2")  # 2x1
    rows = b"".join(b"\0" + row.tobytes() for row in samples)
    got = read_image(raw_png(2, 1, 16, 2, rows), "image")
    assert not got.has_alpha
    np.testing.assert_array_equal(got.pixels, [[[0x12, 0x80, 0xFF], [0x00, 0x01, 0x7F]]])


def test_16_bit_greyscale_is_scaled_not_clipped():
    # Pillow's own I;16 -> L conversion clips everything above 255 to white.
    grey = Image.fromarray(np.array([[0, 255, 32768, 65535]], dtype=np.uint16))
    assert grey.mode == "I;16"
    got = read_image(encode(grey), "image")
    np.testing.assert_array_equal(got.pixels[0, :, 0], [0, 0, 128, 255])
    assert (got.pixels == got.pixels[:, :, :1]).all()  # R = G = B


def test_16_bit_greyscale_with_trns_becomes_rgba():
    grey = Image.fromarray(np.array([[1000, 40000]], dtype=np.uint16))
    got = read_image(encode(grey, transparency=1000), "image")
    assert got.has_alpha
    np.testing.assert_array_equal(got.pixels[0, :, 3], [0, 255])
    np.testing.assert_array_equal(got.pixels[0, 1, :3], [156, 156, 156])


def test_palette_png_with_transparency_becomes_rgba():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.putdata([0, 1, 2])
    got = read_image(encode(img, transparency=bytes([255, 0, 128])), "image")
    assert got.has_alpha and got.format == "png"
    np.testing.assert_array_equal(got.pixels[0], [[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 255, 128]])


def test_palette_png_without_transparency_becomes_rgb():
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 40, 50, 60])
    img.putdata([1, 0])
    got = read_image(encode(img), "image")
    assert not got.has_alpha
    np.testing.assert_array_equal(got.pixels[0], [[40, 50, 60], [10, 20, 30]])


@pytest.mark.parametrize(
    "img, expect",
    [
        (Image.new("L", (2, 2), 77), [77, 77, 77]),
        (Image.new("LA", (2, 2), (77, 9)), [77, 77, 77, 9]),
        (Image.new("1", (2, 2), 1), [255, 255, 255]),
        (Image.new("RGB", (2, 2), (1, 2, 3)), [1, 2, 3]),
    ],
)
def test_greyscale_and_bilevel_pngs_are_converted(img, expect):
    got = read_image(encode(img), "image")
    assert got.pixels.shape == (2, 2, len(expect))
    assert (got.pixels == expect).all()


def test_rgb_png_with_a_trns_colour_becomes_rgba():
    img = Image.new("RGB", (2, 1), (9, 9, 9))
    img.putpixel((1, 0), (200, 100, 0))
    got = read_image(encode(img, transparency=(9, 9, 9)), "image")
    np.testing.assert_array_equal(got.pixels[0, :, 3], [0, 255])


def test_cmyk_jpeg_becomes_sane_rgb():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # pure black on the right
    got = read_image(encode(cmyk, "JPEG", quality=95), "image")
    assert got.format == "jpeg" and got.pixels.shape == (16, 16, 3)
    assert np.abs(got.pixels[4, 2].astype(int) - [0, 255, 255]).max() <= 8
    assert got.pixels[4, 13].max() <= 8


def test_ycbcr_jpeg_is_rgb():
    got = read_image(encode(Image.new("RGB", (8, 8), (0, 128, 255)), "JPEG", quality=100), "image")
    assert np.abs(got.pixels.astype(int) - [0, 128, 255]).max() <= 4


def test_exif_orientation_is_applied():
    img = Image.fromarray(noise(4, 2))  # 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    got = read_image(encode(img, exif=exif.tobytes()), "image")
    assert (got.width, got.height) == (2, 4)
    np.testing.assert_array_equal(got.pixels, np.rot90(np.asarray(img), k=-1))


def test_malformed_exif_is_ignored_not_refused():
    got = read_image(encode(Image.new("RGB", (4, 2)), exif=b"Exif\0\0MM\0*garbage"), "image")
    assert (got.width, got.height) == (4, 2)


# Masks


def test_mask_returns_the_alpha_plane():
    alpha = np.array([[0, 255, 7], [255, 0, 128]], dtype=np.uint8)
    rgba = np.dstack([noise(3, 2), alpha])
    got = read_mask(encode(Image.fromarray(rgba, "RGBA")), "mask", size=(3, 2))
    assert got.dtype == np.uint8 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, alpha)


def test_la_and_palette_masks_are_converted():
    la = Image.new("LA", (2, 2), (0, 0))
    la.putpixel((1, 1), (0, 255))
    np.testing.assert_array_equal(read_mask(encode(la), "mask", size=(2, 2)), [[0, 0], [0, 255]])
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.putdata([0, 1])
    np.testing.assert_array_equal(read_mask(encode(pal, transparency=0), "mask", size=(2, 1)), [[0, 255]])
    grey = Image.new("L", (2, 1), 5)
    grey.putpixel((0, 0), 9)
    np.testing.assert_array_equal(read_mask(encode(grey, transparency=9), "mask", size=(2, 1)), [[0, 255]])


@pytest.mark.parametrize(
    "data, why",
    [
        (encode(Image.new("RGB", (4, 4))), "mode is RGB"),
        (encode(Image.new("L", (4, 4))), "mode is L"),
        (encode(Image.new("RGB", (4, 4)), "JPEG"), "JPEG cannot carry one"),
    ],
)
def test_a_mask_without_alpha_is_refused(data, why):
    error = refusal(read_mask, data, "mask", size=(4, 4))
    assert error["param"] == "mask" and error["code"] == "invalid_mask_image_format"
    assert "no alpha channel" in error["message"] and why in error["message"]


def test_a_mask_of_another_size_is_refused():
    mask = encode(Image.new("RGBA", (4, 4)))
    error = refusal(read_mask, mask, "mask", size=(4, 5))
    assert error["param"] == "mask" and error["code"] == "invalid_mask_size"
    assert "4x4" in error["message"] and "4x5" in error["message"]


def test_a_mask_is_refused_like_an_image_when_it_is_not_one():
    assert refusal(read_mask, b"not a png", "mask", size=(4, 4))["code"] == "invalid_image_format"


# Image references (data URLs, base64, URLs)


PNG = encode(Image.new("RGB", (3, 3), (1, 2, 3)))


@pytest.mark.parametrize(
    "value",
    [
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG).decode(),
        "data:image/webp;name=x.png;base64," + base64.b64encode(PNG).decode(),  # the declared type is not trusted
        "data:image/png;base64,\n" + base64.encodebytes(PNG).decode(),  # MIME line breaks
        base64.b64encode(PNG).decode(),
        base64.urlsafe_b64encode(PNG).decode().rstrip("="),
        "  " + base64.b64encode(PNG).decode() + "\n",
    ],
)
def test_data_urls_and_bare_base64_decode_to_the_bytes(value):
    assert decode_reference(value, "image") == PNG


@pytest.mark.parametrize(
    "url", ["https://images.example.com/a.png?x=1", "http://127.0.0.1:8000/a.png", "HTTPS://X.Y/z"]
)
def test_http_urls_are_returned_for_the_fetcher(url):
    assert decode_reference(url, "images[0].image_url") == url


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://host/a.png", "gopher://host/", "javascript:alert(1)", "C:\\a.png"]
)
def test_other_schemes_are_refused(url):
    error = refusal(decode_reference, url, "images[0].image_url")
    assert error["param"] == "images[0].image_url" and error["code"] == "invalid_image_url"
    assert "is not supported" in error["message"]


@pytest.mark.parametrize(
    "value, code",
    [
        ("data:image/png,%89PNG", "invalid_image_url"),  # a data URL must say ;base64
        ("data:image/png;base64", "invalid_image_url"),  # no comma, no payload
        ("data:image/png;base64,", "invalid_base64"),
        ("data:image/png;base64,iVBO!!!!", "invalid_base64"),
        ("", "invalid_base64"),
        ("   \n", "invalid_base64"),
        ("not base64 at all!", "invalid_base64"),
        ("abcde", "invalid_base64"),  # one character too many for whole bytes
        ("aGVsbG8=é", "invalid_base64"),
    ],
)
def test_bad_references_are_refused(value, code):
    error = refusal(decode_reference, value, "image")
    assert error["param"] == "image" and error["code"] == code
