"""Edits and variations through the in-process ingress (real tiny stages, no Ray):
the multipart and JSON bodies as the SDKs send them, masks, streams, and every
bad input answered 4xx in OpenAI's envelope naming its parameter."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_ingress_http import assert_error

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
GEN = "/v1/images/generations"


def png(size=(256, 256), mode="RGB", color=None, alpha=None) -> bytes:
    w, h = size
    if color is None:
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    else:
        arr = np.full((h, w, 3), color, np.uint8)
    image = Image.fromarray(arr)
    if alpha is not None:
        image.putalpha(Image.fromarray(alpha))
    elif mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def band_mask(size=(256, 256)) -> tuple[bytes, np.ndarray]:
    """A mask PNG whose alpha is 0 (edit) in a band, 255 (keep) elsewhere."""
    w, h = size
    alpha = np.full((h, w), 255, np.uint8)
    alpha[h // 4 : h // 2, :] = 0
    return png(size, alpha=alpha), alpha


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def edit(client, files, data=None, url=EDITS):
    return client.post(url, files=files, data={"prompt": "a red hat", **(data or {})})


def test_edit_one_image_multipart(ingress_client):
    resp = edit(ingress_client, {"image": ("otter.png", png(), "image/png")}, {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json", "n": "2"})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == 2 and decode(data[0]["b64_json"]).shape == (256, 256, 3)
    assert data[0]["seed"] + 1 == data[1]["seed"]


def test_mask_protects_every_opaque_pixel_exactly(ingress_client):
    mask, alpha = band_mask()
    original = np.asarray(Image.open(io.BytesIO(png())).convert("RGB"))
    resp = edit(
        ingress_client,
        {"image": ("a.png", png(), "image/png"), "mask": ("m.png", mask, "image/png")},
        {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"},
    )
    assert resp.status_code == 200, resp.text
    out = decode(resp.json()["data"][0]["b64_json"])
    keep = alpha == 255
    assert np.array_equal(out[keep], original[keep])
    assert not np.array_equal(out[~keep], original[~keep])  # the band was edited


def test_the_images_own_transparency_is_the_mask_for_dall_e_2(ingress_client):
    alpha = np.full((256, 256), 255, np.uint8)
    alpha[100:150, 100:150] = 0
    source = png(alpha=alpha)
    resp = edit(ingress_client, {"image": ("a.png", source, "image/png")}, {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"})
    assert resp.status_code == 200, resp.text
    out = decode(resp.json()["data"][0]["b64_json"])
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    assert np.array_equal(out[alpha == 255], original[alpha == 255])


def test_auto_size_keeps_the_aspect(ingress_client):
    resp = edit(ingress_client, {"image": ("wide.png", png((384, 256)), "image/png")}, {"model": "gpt-image-1", "quality": "low"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["size"] == "1536x1024"
    usage = resp.json()["usage"]
    assert usage["input_tokens_details"]["image_tokens"] > 0
    assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"] + usage["input_tokens_details"]["image_tokens"]


def test_edit_stream_sends_image_edit_events(ingress_client):
    resp = edit(
        ingress_client,
        {"image": ("a.png", png((256, 256)), "image/png")},
        {"model": "gpt-image-1", "size": "1024x1024", "quality": "high", "stream": "true", "partial_images": "1", "input_fidelity": "low"},
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [line[len("event: "):] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events[-1] == "image_edit.completed" and "image_edit.partial_image" in events


def test_json_body_with_a_data_url(ingress_client):
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    resp = ingress_client.post(EDITS, json={"prompt": "hat", "model": "gpt-image-1", "quality": "low", "size": "1024x1024", "images": [{"image_url": url}]})
    assert resp.status_code == 200, resp.text
    assert decode(resp.json()["data"][0]["b64_json"]).shape == (1024, 1024, 3)


def test_image_on_generations_is_an_edit(ingress_client):
    mask_source = png(alpha=band_mask()[1])
    b64 = base64.b64encode(mask_source).decode()
    resp = ingress_client.post("/api/images/generations", json={"prompt": "hat", "model": "dall-e-2", "size": "256x256", "response_format": "b64_json", "image": b64})
    assert resp.status_code == 200, resp.text
    keep = band_mask()[1] == 255
    original = np.asarray(Image.open(io.BytesIO(mask_source)).convert("RGB"))
    assert np.array_equal(decode(resp.json()["data"][0]["b64_json"])[keep], original[keep])


def test_variations_each_from_its_own_seed(ingress_client):
    resp = ingress_client.post(VARIATIONS, files={"image": ("a.png", png(), "image/png")}, data={"n": "2", "size": "256x256", "response_format": "b64_json"})
    assert resp.status_code == 200, resp.text
    a, b = (decode(d["b64_json"]) for d in resp.json()["data"])
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "files, data, status, param, code",
    [
        ({"image": ("a.png", b"not an image at all", "image/png")}, {}, 400, "image", None),
        ({"image": ("a.png", png()[:200], "image/png")}, {}, 400, "image", None),
        ({"image": ("a.png", png((256, 128)), "image/png")}, {"model": "dall-e-2"}, 400, "image", None),
        ({"image": ("a.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")}, {}, 400, "mask", "invalid_mask_image_format"),
        ({"image": ("a.png", png(), "image/png"), "mask": ("m.png", band_mask((128, 128))[0], "image/png")}, {}, 400, "mask", None),
        ({"image[]": [("a.png", png(), "image/png"), ("b.png", png(), "image/png")]}, {"model": "gpt-image-1"}, 400, "image[]", None),
        ({"image[]": [("a.png", png(), "image/png")] * 17}, {"model": "gpt-image-1"}, 400, "image[]", "too_many_images"),
        ({"image": ("a.png", png(), "image/png")}, {"model": "dall-e-3"}, 400, "model", None),
        ({"image": ("a.png", png(), "image/png")}, {"n": "two"}, 400, "n", None),
        ({"image": ("a.png", png(), "image/png")}, {"n": "11"}, 400, "n", None),
        ({"image": ("a.png", png(), "image/png")}, {"stream": "maybe"}, 400, "stream", None),
        ({"image": ("a.png", png(), "image/png")}, {"input_fidelity": "medium"}, 400, "input_fidelity", None),
        ({"image": ("a.png", png(), "image/png")}, {"size": "100x100", "model": "dall-e-2"}, 400, "size", None),
    ],
)
def test_bad_edit_inputs_are_4xx_naming_the_parameter(ingress_client, files, data, status, param, code):
    # httpx takes repeated fields as a list of tuples.
    flat = [(k, v) for k, vs in files.items() for v in (vs if isinstance(vs, list) else [vs])]
    resp = ingress_client.post(EDITS, files=flat, data={"prompt": "hat", **data})
    assert_error(resp, status, param, code)


def test_missing_image_and_missing_prompt(ingress_client):
    assert_error(ingress_client.post(EDITS, data={"prompt": "hat"}, files={"x": ("x.txt", b"x")}), 400, "x")
    assert_error(ingress_client.post(EDITS, files={"image": ("a.png", png(), "image/png")}), 400, "prompt")


def test_json_file_id_is_refused(ingress_client):
    resp = ingress_client.post(EDITS, json={"prompt": "hat", "images": [{"file_id": "file-123"}]})
    assert_error(resp, 400, "images[0].file_id")


def test_image_urls_are_not_fetched_by_default(ingress_client):
    """The same kind of URL the Ray graph's test config allows (tests/integration/test_edits_client.py)."""
    from tests.image_server import ImageServer

    server = ImageServer()
    try:
        url = server.put("/a.png", png())
        resp = ingress_client.post(EDITS, json={"prompt": "hat", "images": [{"image_url": url}]})
    finally:
        server.stop()
    error = assert_error(resp, 400, "images[0].image_url")
    assert "upload" in error["message"] or "data URL" in error["message"]


def test_variations_refuse_other_families_and_masks(ingress_client):
    image = ("a.png", png(), "image/png")
    assert_error(ingress_client.post(VARIATIONS, files={"image": image}, data={"model": "gpt-image-1"}), 400, "model")
    assert_error(ingress_client.post(VARIATIONS, files={"image": image, "mask": image}), 400, "mask")


def test_wrong_content_type_is_415(ingress_client):
    resp = ingress_client.post(EDITS, content=b"prompt=hat", headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(resp, 415)


def test_upload_limit_is_its_own_and_enforced_while_streaming(ingress_client):
    limit = ingress_client.instance.config.max_upload_bytes
    assert limit > ingress_client.instance.config.max_body_bytes
    # An upload over the JSON limit is accepted...
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    big = buf.getvalue()  # noise does not compress: well over the 64 KiB JSON limit of the test config
    assert len(big) > ingress_client.instance.config.max_body_bytes
    resp = edit(ingress_client, {"image": ("a.png", big, "image/png")}, {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"})
    assert resp.status_code == 200, resp.text

    # ...and one over the upload limit is refused while it streams in (chunked: no Content-Length).
    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(limit // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    resp = ingress_client.post(EDITS, content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(resp, 413)


def test_edit_prompts_are_moderated(ingress_client, tmp_path):
    from serve_app.moderation import PatternModerator

    moderation = tmp_path / "moderation.yaml"
    moderation.write_text("categories:\n  test:\n    severe: true\n    patterns: ['forbidden\\s+thing']\n")
    before = ingress_client.instance.moderator
    ingress_client.instance.moderator = PatternModerator.from_file(moderation)
    try:
        resp = edit(ingress_client, {"image": ("a.png", png(), "image/png")}, {"prompt": "a forbidden thing", "model": "dall-e-2"})
    finally:
        ingress_client.instance.moderator = before
    assert_error(resp, 400, "prompt", "moderation_blocked")


def test_composite_keeps_protected_pixels_and_feathers_only_the_edited_side():
    from serve_app.compositing import composite, keep_weight

    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0
    original = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    generated = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = composite(generated, original, alpha, feather_px=3)
    assert np.array_equal(out[alpha == 255], original[alpha == 255])
    weight = keep_weight(alpha, 3)
    assert weight[16, 16] == 0.0 and np.array_equal(out[16, 16], generated[16, 16])  # deep inside: all generated
    assert 0.0 < weight[8, 16] < 1.0  # the first edited row blends
    assert np.array_equal(keep_weight(alpha, 0)[alpha == 0], np.zeros((alpha == 0).sum(), np.float32))


def test_a_malformed_multipart_body_is_400(ingress_client):
    body = b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhat\r\n--b\r\nno headers here\r\n--b--\r\n"
    resp = ingress_client.post(EDITS, content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(resp, 400, code="invalid_multipart")


def test_a_file_over_its_familys_limit_is_refused(ingress_client):
    # dall-e-2 takes PNGs under 4 MB; noise does not compress, so 1200x1200 is about 4.3 MB.
    noise = np.random.default_rng(3).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=0)
    assert len(buf.getvalue()) > 4 << 20
    resp = edit(ingress_client, {"image": ("big.png", buf.getvalue(), "image/png")}, {"model": "dall-e-2"})
    assert_error(resp, 400, "image", "image_too_large")


def test_models_say_which_take_any_size(ingress_client):
    models = {m["id"]: m for m in ingress_client.get("/v1/models").json()["data"]}
    assert "max_pixels" not in models["gpt-image-1"] and "max_pixels" not in models["dall-e-2"]
    assert models["gpt-image-2"]["max_pixels"] == min(3840 * 2160, 1536 * 1536)
    # What it advertises holds: a free size within it is served, a fixed-size model refuses one.
    assert ingress_client.post(GEN, json={"prompt": "otter", "model": "gpt-image-2", "size": "256x256"}).status_code == 200
    assert_error(ingress_client.post(GEN, json={"prompt": "otter", "model": "gpt-image-1", "size": "256x256"}), 400, "size")
