"""The deployed graph through the official openai client and plain HTTP."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.security import UrlSigner
from tests.conftest import TEST_SIGNING_KEY

pytestmark = pytest.mark.ray


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_b64_json(client):
    img = client.images.generate(model="dall-e-2", prompt="A cute baby sea otter", size="512x512", response_format="b64_json")
    assert len(img.data) == 1 and img.created > 0
    pic = decode(img.data[0].b64_json)
    assert pic.format == "PNG" and pic.size == (512, 512)


@pytest.mark.parametrize("size", ["256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536"])
def test_every_size_decodes_to_its_dimensions(client, size):
    # gpt-image-2: the family that takes every one of these sizes.
    img = client.images.generate(model="gpt-image-2", prompt="otter", size=size, output_format="jpeg")
    w, h = map(int, size.split("x"))
    assert decode(img.data[0].b64_json).size == (w, h)


def test_auto_size_is_the_model_default(client):
    # The pipeline's default, which gpt-image-2 takes (gpt-image-1 would give 1024x1024).
    img = client.images.generate(model="gpt-image-2", prompt="otter", size="auto")
    assert decode(img.data[0].b64_json).size == (512, 512)


def test_n3_gives_three_different_images(client):
    img = client.images.generate(model="gpt-image-2", prompt="otter", n=3, size="256x256")
    pixels = [np.asarray(decode(d.b64_json)) for d in img.data]
    assert len(pixels) == 3
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_every_output_format(client, fmt, magic):
    img = client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", output_format=fmt, output_compression=80)
    data = base64.b64decode(img.data[0].b64_json)
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).format == fmt.upper()


def test_seed_reproduces_the_image(client):
    a = client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", extra_body={"seed": 1234})
    b = client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", extra_body={"seed": 1234})
    c = client.images.generate(model="gpt-image-2", prompt="otter", size="256x256", extra_body={"seed": 1235})
    assert a.data[0].b64_json == b.data[0].b64_json != c.data[0].b64_json


def test_default_response_format_follows_the_family(client):
    assert client.images.generate(model="dall-e-2", prompt="otter", size="256x256").data[0].url
    assert client.images.generate(model="dall-e-3", prompt="otter", size="1024x1024").data[0].url
    assert client.images.generate(model="gpt-image-2", prompt="otter", size="256x256").data[0].b64_json
    # no model: the configured default, dall-e-2
    assert client.images.generate(prompt="otter", size="256x256").data[0].url


def test_url_is_fetched_with_plain_http_and_tampering_is_refused(client):
    img = client.images.generate(model="dall-e-2", prompt="otter", size="256x256", response_format="url")
    url = img.data[0].url
    resp = httpx.get(url)  # no API key: the signature is the credential
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(resp.content)).size == (256, 256)

    base, query = url.split("?")
    params = dict(p.split("=") for p in query.split("&"))
    bad_sig = params["sig"][:-1] + ("0" if params["sig"][-1] != "0" else "1")
    for bad in (
        f"{base}?expires={params['expires']}&sig={bad_sig}",
        f"{base}?expires={int(params['expires']) + 10}&sig={params['sig']}",
        base,
    ):
        r = httpx.get(bad)
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_signature"

    # A correctly signed URL whose time has passed.
    name = base.rsplit("/", 1)[1]
    expires, sig = UrlSigner(TEST_SIGNING_KEY, 60, clock=lambda: time.time() - 3600).sign(name)
    r = httpx.get(f"{base}?expires={expires}&sig={sig}")
    assert r.status_code == 403 and r.json()["error"]["code"] == "url_expired"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 11}, "n"),
        ({"size": "300x300"}, "size"),
        ({"output_compression": 101}, "output_compression"),
        ({"model": "no-such-model"}, "model"),
        ({"extra_body": {"n": "two"}}, "n"),
    ],
)
def test_bad_request_names_the_parameter(client, kwargs, param):
    kwargs = {"model": "dall-e-2", "prompt": "otter", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(**kwargs)
    assert err.value.status_code == 400 and err.value.param == param


def test_wrong_key_is_401(service_url):
    bad = openai.OpenAI(base_url=f"{service_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="otter")
    resp = httpx.post(f"{service_url}/v1/images/generations", json={"prompt": "otter"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_models_list_and_health(client, service_url):
    ids = [m.id for m in client.models.list().data]
    assert {"dall-e-2", "dall-e-3", "gpt-image-1", "tiny-sd"} <= set(ids)
    assert httpx.get(f"{service_url}/health").json() == {"status": "ok"}


def test_raw_http_errors_are_enveloped(service_url):
    from tests.conftest import TEST_API_KEY

    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    for path in ("/v1/images/generations", "/images/generations", "/api/images/generations"):
        r = httpx.post(f"{service_url}{path}", content=b"{oops", headers={**auth, "content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.headers["x-request-id"]
    r = httpx.get(f"{service_url}/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_each_replica_loads_only_its_stage_and_sets_threads(service_url):
    from ray import serve

    def describe(name):
        return serve.get_deployment_handle(name, app_name="images").describe.remote().result()

    te, dn, vae = describe("TextEncoder-tiny-sd"), describe("Denoiser-tiny-sd"), describe("VaeDecoder-tiny-sd")
    assert te["modules"] == ["CLIPTextModel"]
    assert dn["modules"] == ["UNet2DConditionModel"]
    assert vae["modules"] == ["AutoencoderKL"]
    # Ray gives a 0.25-CPU actor one OpenMP thread; the config's 2 must win,
    # in the threads that compute: a 512x512 denoise must keep both cores busy.
    from serve_app.pipeline.types import DenoiseJob

    emb = serve.get_deployment_handle("TextEncoder-tiny-sd", app_name="images").encode.remote("otter").result()
    for _ in range(2):  # the first run of a shape also pays one-off, single-threaded setup
        serve.get_deployment_handle("Denoiser-tiny-sd", app_name="images").denoise.remote(DenoiseJob(emb, [1], 512, 512, 4, 7.5)).result()
    assert describe("Denoiser-tiny-sd")["last_batch_cpu_per_wall"] > 1.3
