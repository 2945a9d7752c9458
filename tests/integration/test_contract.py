"""The OpenAI Images contract on the real graph, through the official client.

Every JSON response and stream event is validated against the protocol's
response models (which forbid unknown fields) as well as parsed by the SDK.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image
from ray import serve

from serve_app.protocol import CompletedEvent, ImagesResponse, ModelList, PartialImageEvent

pytestmark = pytest.mark.ray


def generate_raw(client, **kwargs):
    """(validated response model, headers) of one generation."""
    raw = client.images.with_raw_response.generate(**kwargs)
    body = raw.http_response.json()
    raw.parse()  # the SDK must accept it too
    return ImagesResponse.model_validate(body), raw.headers


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def steps_run() -> int:
    return serve.get_deployment_handle("Denoiser-tiny-sd", app_name="images").describe.remote().result()["steps_run"]


# --- the family table: one case per cell that can fail ---------------------------------

@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"model": "dall-e-2", "prompt": "x" * 1001}, "prompt"),
        ({"model": "dall-e-3", "prompt": "x" * 4001}, "prompt"),
        ({"model": "gpt-image-1", "prompt": "x" * 32001}, "prompt"),
        ({"model": "dall-e-2", "n": 11}, "n"),
        ({"model": "dall-e-3", "n": 2}, "n"),
        ({"model": "gpt-image-1", "n": 11}, "n"),
        ({"model": "dall-e-2", "size": "1792x1024"}, "size"),
        ({"model": "dall-e-3", "size": "512x512"}, "size"),
        ({"model": "gpt-image-1", "size": "1280x720"}, "size"),
        ({"model": "gpt-image-1", "size": "256x256"}, "size"),
        ({"model": "gpt-image-2", "size": "1000x1000"}, "size"),
        ({"model": "gpt-image-2", "size": "1600x400"}, "size"),
        ({"model": "gpt-image-2", "size": "2048x2048"}, "size"),
        ({"model": "dall-e-2", "quality": "hd"}, "quality"),
        ({"model": "dall-e-3", "quality": "low"}, "quality"),
        ({"model": "gpt-image-1", "quality": "standard"}, "quality"),
        ({"model": "tiny-sd", "quality": "max"}, "quality"),
        ({"model": "gpt-image-1", "quality": "xhigh"}, "quality"),
        ({"model": "gpt-image-2", "quality": "max"}, "quality"),
        ({"model": "image"}, "model"),
        ({"model": "dall-e-3", "style": "cartoon"}, "style"),
        ({"model": "gpt-image-1", "background": "transparent", "output_format": "jpeg"}, "background"),
        ({"model": "gpt-image-1", "output_format": "gif"}, "output_format"),
        ({"model": "gpt-image-2", "output_format": "svg", "n": 2}, "n"),
        ({"model": "gpt-image-1", "partial_images": 4}, "partial_images"),
        ({"model": "gpt-image-1", "frame_count": 1}, "frame_count"),
        ({"model": "gpt-image-1", "moderation": "high"}, "moderation"),
    ],
)
def test_family_rule_violations_are_400_with_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(**{"prompt": "otter", **kwargs})
    assert err.value.param == param, err.value.message


def test_dall_e_2_cells(client):
    resp, _ = generate_raw(client, model="dall-e-2", prompt="otter", n=2, size="256x256", quality="standard")
    assert len(resp.data) == 2 and all(d.url for d in resp.data)
    assert resp.usage is None and resp.size is None and resp.data[0].revised_prompt is None


def test_dall_e_3_cells(client):
    # standard, not hd: the cell is the size and the style; hd's doubled steps at 1792x1024 cost the suite ~20 s.
    resp, _ = generate_raw(client, model="dall-e-3", prompt="otter", size="1792x1024", style="natural", response_format="b64_json")
    assert picture(resp.data[0].b64_json).size == (1792, 1024)
    assert resp.data[0].revised_prompt == "otter"  # natural: no template
    vivid, _ = generate_raw(client, model="dall-e-3", prompt="otter", response_format="b64_json")
    assert vivid.data[0].revised_prompt.startswith("otter, vivid")
    assert picture(vivid.data[0].b64_json).size == (1024, 1024)


def test_revised_prompt_shows_truncation(client):
    # Cut where the encoder's window ends, otherwise as written: case and punctuation kept.
    long = "A Sea Otter, floating on its back; kelp (green!) around it. " * 20
    resp, _ = generate_raw(client, model="dall-e-3", prompt=long, style="natural", response_format="b64_json")
    revised = resp.data[0].revised_prompt
    assert revised and len(revised) < len(long) and long.startswith(revised)
    assert revised.startswith("A Sea Otter, floating on its back; kelp (green!) around it. A Sea Otter,")


def test_gpt_image_cells_and_extras(client):
    resp, _ = generate_raw(client, model="gpt-image-2", prompt="otter", size="1280x720", quality="low", output_format="webp", output_compression=50)
    assert picture(resp.data[0].b64_json).size == (1280, 720) and picture(resp.data[0].b64_json).format == "WEBP"
    assert (resp.background, resp.output_format, resp.quality, resp.size) == ("opaque", "webp", "low", "1280x720")
    assert resp.usage is not None
    url, _ = generate_raw(client, model="gpt-image-2", prompt="otter", size="256x256", response_format="url")
    assert url.data[0].url  # url is honoured for gpt-image too
    auto, _ = generate_raw(client, model="gpt-image-2", prompt="otter", size="auto", quality="auto")
    assert auto.size == "512x512" and auto.quality == "medium"


def test_request_without_model_but_gpt_param_uses_gpt_image_default(client):
    resp, _ = generate_raw(client, prompt="otter", size="256x256", output_format="jpeg")
    assert resp.output_format == "jpeg" and resp.usage is not None and resp.data[0].b64_json


def test_ignored_parameters_header(client):
    resp, headers = generate_raw(client, model="dall-e-2", prompt="otter", size="256x256", style="vivid", output_format="jpeg", extra_body={"complexity": "low"})
    assert set(headers["x-ignored-parameters"].split(",")) == {"style", "output_format", "complexity"}
    assert picture(client.images.generate(model="dall-e-2", prompt="otter", size="256x256", response_format="b64_json", output_format="jpeg").data[0].b64_json).format == "PNG"
    _, headers = generate_raw(client, model="gpt-image-2", prompt="otter", size="256x256")
    assert "x-ignored-parameters" not in headers


def test_quality_changes_the_work_done(client):
    counts = {}
    for q in ("low", "high"):
        before = steps_run()
        client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", quality=q)
        counts[q] = steps_run() - before
    assert counts["high"] > counts["low"] > 0


def test_usage_on_the_real_graph(client, tiny_sd_dir):
    """Usage counts the prompt in the model's own tokenizer; the output-token
    table for every size and tier is checked on the in-process ingress
    (tests/unit/test_ingress_http.py::test_usage_for_three_tiers)."""
    from transformers import CLIPTokenizer

    prompt = "A cute baby sea otter"
    text_tokens = len(CLIPTokenizer.from_pretrained(str(tiny_sd_dir / "tokenizer"))(prompt).input_ids) - 2
    resp, _ = generate_raw(client, model="gpt-image-1", prompt=prompt, size="1024x1024", quality="low", output_format="jpeg")
    u = resp.usage
    assert u.input_tokens_details.text_tokens == text_tokens and u.input_tokens_details.image_tokens == 0
    assert u.input_tokens == text_tokens and u.output_tokens == 272 and u.total_tokens == text_tokens + 272


# --- streaming --------------------------------------------------------------------------

def test_stream_two_partials_then_completed(client):
    events = list(client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", stream=True, partial_images=2, extra_body={"seed": 9}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials = [PartialImageEvent.model_validate(e.to_dict()) for e in events[:2]]
    done = CompletedEvent.model_validate(events[2].to_dict())
    assert [p.partial_image_index for p in partials] == [0, 1]
    final = np.asarray(picture(done.b64_json))
    for p in partials:
        pixels = np.asarray(picture(p.b64_json))
        assert pixels.shape == final.shape and not np.array_equal(pixels, final)
    assert done.usage.output_tokens > 0 and done.size == "256x256"
    # The streamed final image is the image the same seed gives without streaming.
    plain = client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", extra_body={"seed": 9})
    assert np.array_equal(np.asarray(picture(plain.data[0].b64_json)), final)


def test_stream_zero_partials_and_n2(client):
    events = list(client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]
    events = list(client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", n=2, stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    assert events[2].b64_json != events[3].b64_json


@pytest.mark.parametrize(
    "model, size, quality, partials",
    [
        ("dall-e-2", "256x256", "standard", 1),
        ("dall-e-3", "1024x1024", "standard", 0),
        ("gpt-image-1", "1024x1024", "low", 0),
        ("gpt-image-2.5-flare", "256x256", "xhigh", 1),
    ],
)
def test_stream_on_every_family_ends_with_its_image(client, model, size, quality, partials):
    # gpt-image-2 streams in the tests above; dall-e used to answer plain JSON, which the SDK iterated as nothing.
    events = list(client.images.generate(model=model, prompt="otter", size=size, quality=quality, stream=True, partial_images=partials))
    assert [e.type for e in events] == ["image_generation.partial_image"] * partials + ["image_generation.completed"]
    done = CompletedEvent.model_validate(events[-1].to_dict())
    assert picture(done.b64_json).size == tuple(map(int, size.split("x"))) and done.quality == quality


def test_first_preview_arrives_before_the_denoiser_finishes(client):
    # 16 steps at 1024x1024 with one preview after step 8: if the preview
    # were only sent with the result, it would arrive together with it.
    before = steps_run()
    stream = client.images.generate(model="gpt-image-2.5-sunburst", prompt="otter", size="1024x1024", quality="max", stream=True, partial_images=1)
    t0 = time.monotonic()
    first = next(iter(stream))
    t_first = time.monotonic() - t0
    rest = list(stream)
    t_done = time.monotonic() - t0
    assert first.type == "image_generation.partial_image" and rest[-1].type == "image_generation.completed"
    assert steps_run() - before == 16
    assert t_first < 0.75 * t_done, f"first preview at {t_first:.2f}s of {t_done:.2f}s"


# --- transparency and moderation --------------------------------------------------------

def test_transparent_background_end_to_end(client):
    resp, _ = generate_raw(client, model="gpt-image-2", prompt="a red ball", size="256x256", background="transparent")
    img = picture(resp.data[0].b64_json)
    assert resp.background == "transparent" and img.format == "PNG" and img.mode == "RGBA"
    assert np.asarray(img)[..., 3].min() < 255
    opaque, _ = generate_raw(client, model="gpt-image-2", prompt="a red ball", size="256x256", background="opaque", output_format="webp")
    assert opaque.background == "opaque" and picture(opaque.data[0].b64_json).mode == "RGB"


def test_moderation_blocks_before_model_work(client):
    before = steps_run()
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="gpt-image-2", prompt="a gory battlefield", size="256x256")
    assert err.value.code == "moderation_blocked" and err.value.type == "image_generation_user_error"
    assert steps_run() == before
    # `low` applies only the severe categories.
    assert client.images.generate(model="gpt-image-2", prompt="a gory battlefield", size="256x256", moderation="low").data


def test_models_carry_their_capabilities(client, service_url):
    import httpx

    from tests.conftest import TEST_API_KEY

    body = httpx.get(f"{service_url}/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"}).json()
    models = {m["id"]: m for m in ModelList.model_validate(body).model_dump()["data"]}
    assert {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "gpt-image-2.6-flare"} <= set(models)
    assert models["dall-e-3"]["family"] == "dall-e-3" and models["dall-e-3"]["sizes"] == ["1024x1024", "1792x1024", "1024x1792"]
    assert models["gpt-image-1"]["sizes"] == ["1024x1024", "1536x1024", "1024x1536", "auto"]
    assert "xhigh" in models["gpt-image-2.5-flare"]["qualities"] and "xhigh" not in models["gpt-image-1"]["qualities"]
    assert models["dall-e-2"]["default_steps"] == 4


def test_forwarded_headers_from_an_untrusted_peer_and_head_through_rays_proxy(service_url):
    """This client connects from 127.0.0.1, which Ray's HTTP proxy (uvicorn)
    trusts: it applies X-Forwarded-Proto and -For before the ingress sees the
    request. The session's app trusts no proxy, so the URL stays the
    service's own (it was https://127.0.0.1:<port>/... before)."""
    import httpx

    from tests.conftest import TEST_API_KEY

    resp = httpx.post(
        f"{service_url}/v1/images/generations",
        json={"model": "dall-e-2", "prompt": "otter", "size": "256x256"},
        headers={
            "Authorization": f"Bearer {TEST_API_KEY}",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "images.example.com",
            "X-Forwarded-For": "198.51.100.7",
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    url = resp.json()["data"][0]["url"]
    assert url.startswith(f"{service_url}/v1/images/files/"), url
    got, head = httpx.get(url), httpx.head(url)
    assert head.status_code == got.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(got.content) and head.headers["content-type"] == "image/png"
    refused = httpx.delete(url)
    assert refused.status_code == 405 and set(refused.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_client_disconnect_stops_the_denoiser_within_steps(service_url):
    import httpx

    from tests.conftest import TEST_API_KEY

    before = steps_run()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{service_url}/v1/images/generations",
            json={"model": "gpt-image-2.5-sunburst", "prompt": "otter", "size": "1024x1024", "quality": "max"},
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
            timeout=1.0,  # the client gives up and closes the connection
        )
    # 16 steps at 1024x1024 take about 3 s here (and ~2 s of them are left
    # when the client leaves); wait twice the whole run.
    time.sleep(6)
    ran = steps_run() - before
    assert ran < 16, f"{ran} of 16 steps ran after the client went away"
