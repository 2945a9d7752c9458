"""Models and images on S3 (moto's S3 server on 127.0.0.1), through the real
builder on the session's Ray cluster: a second application, ``images-s3``
at route prefix /s3, beside the session's ``images`` app.

Its registry has two pipelines on s3://: ``tiny-s3`` (the whole tiny model)
and ``partial`` (the same model without its UNet), which must not keep
``tiny-s3`` from serving. They share their model stages (one stage group,
``s3``): each replica loads both, and the broken one is reported alone.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import yaml

from serve_app.deployments.sweeper import SWEEP_GRACE_S
from tests.conftest import TEST_API_KEY
from tests.integration.conftest import STAGE_OPTIONS

pytestmark = pytest.mark.ray

APP = "images-s3"
BUCKET = "images"
PREFIX = "generated"
TTL_S = 3600
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(scope="module")
def s3_app(service_url, app_args, s3_endpoint, s3_models, tmp_path_factory):
    from ray import serve

    from serve_app.app import build_app

    root = tmp_path_factory.mktemp("s3-service")
    s3_endpoint.client().create_bucket(Bucket=BUCKET)
    options = s3_endpoint.storage_options
    sizes = {"sizes": ["256x256", "512x512", "1024x1024"], "default_size": "256x256"}
    registry = {
        "pipelines": {
            "tiny-s3": {"source": f"{s3_models}/tiny-sd/", "storage_options": options, **sizes},
            "partial": {"source": f"{s3_models}/partial/", "storage_options": options, **sizes},
        },
        "models": [
            {"id": "dall-e-2", "pipeline": "tiny-s3", "family": "dall-e-2"},
            {"id": "gpt-image-1", "pipeline": "tiny-s3", "family": "gpt-image"},
            {"id": "partial-model", "pipeline": "partial", "family": "gpt-image"},
        ],
        "default_model": "dall-e-2",
    }
    (root / "models.yaml").write_text(yaml.safe_dump(registry))
    args = {
        **app_args,
        "models": str(root / "models.yaml"),
        "data_dir": str(root / "data"),
        "image_store": f"s3://{BUCKET}/{PREFIX}",
        "image_store_options": options,
        "url_ttl_s": TTL_S,
        "model_cache_dir": str(root / "cache"),
        "sweep_remote_store": True,
        "stages": STAGE_OPTIONS,
        "stage_groups": {"s3": ["tiny-s3", "partial"]},
    }
    serve.run(build_app(args), name=APP, route_prefix="/s3")
    yield SimpleNamespace(url=f"{service_url}/s3", cache=root / "cache")
    serve.delete(APP)


@pytest.fixture(scope="module")
def s3_client(s3_app):
    return openai.OpenAI(base_url=f"{s3_app.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=120)


def handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP)


def cached_files(cache: Path, stage: str) -> set[str]:
    (folder,) = [d for d in cache.iterdir() if d.name.startswith("models-tiny-sd-")]
    root = folder / stage
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def test_model_loads_from_s3_and_each_stage_caches_only_its_folders(s3_app):
    for stage, modules in (("TextEncoder", ["CLIPTextModel"]), ("Denoiser", ["UNet2DConditionModel"]), ("VaeDecoder", ["AutoencoderKL"])):
        described = handle(f"{stage}-s3").describe.remote("tiny-s3").result()
        assert described["problem"] is None and described["modules"] == modules
        assert described["pipelines"] == ["partial", "tiny-s3"]
    tops = {stage: {f.split("/")[0] for f in cached_files(s3_app.cache, stage)} for stage in ("text_encoder", "denoiser", "vae_decoder")}
    assert tops == {
        "text_encoder": {"model_index.json", "tokenizer", "text_encoder"},
        "denoiser": {"model_index.json", "unet", "scheduler", "vae"},
        "vae_decoder": {"model_index.json", "vae", "unet"},
    }
    assert {f for f in cached_files(s3_app.cache, "denoiser") if f.startswith("vae/")} == {"vae/config.json"}
    # The VAE stage reads only the UNet's config (is it an inpainting UNet?), never its weights.
    assert {f for f in cached_files(s3_app.cache, "vae_decoder") if f.startswith("unet/")} == {"unet/config.json"}


def test_url_is_a_presigned_s3_get_that_needs_no_credentials(s3_client, s3_endpoint):
    by_url = s3_client.images.generate(model="dall-e-2", prompt="otter", n=2, response_format="url", extra_body={"seed": 99})
    by_b64 = s3_client.images.generate(model="dall-e-2", prompt="otter", n=2, response_format="b64_json", extra_body={"seed": 99})
    for url_image, b64_image in zip(by_url.data, by_b64.data):
        url = url_image.url
        assert url.startswith(f"{s3_endpoint.url}/{BUCKET}/{PREFIX}/") and f"X-Amz-Expires={TTL_S}" in url
        resp = httpx.get(url)  # plain HTTP: no API key, no AWS credentials
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert resp.content == base64.b64decode(b64_image.b64_json)  # the very image, byte for byte
    assert by_url.data[0].url != by_url.data[1].url

    jpeg = s3_client.images.generate(model="gpt-image-1", prompt="otter", response_format="url", output_format="jpeg")
    resp = httpx.get(jpeg.data[0].url)
    assert resp.headers["content-type"] == "image/jpeg" and resp.content[:3] == b"\xff\xd8\xff"


def test_s3_refuses_tampered_and_expired_urls(s3_client, s3_endpoint):
    url = s3_client.images.generate(model="dall-e-2", prompt="otter", response_format="url").data[0].url
    sig = url.rsplit("X-Amz-Signature=", 1)[1]
    tampered = url[: -len(sig)] + sig[:-1] + ("0" if sig[-1] != "0" else "1")
    for bad in (tampered, url.replace(f"X-Amz-Expires={TTL_S}", f"X-Amz-Expires={TTL_S * 2}"), url.split("?")[0]):
        assert httpx.get(bad).status_code == 403
    assert b"SignatureDoesNotMatch" in httpx.get(tampered).content
    try:
        s3_endpoint.clock_offset_s = TTL_S - 30
        assert httpx.get(url).status_code == 200
        s3_endpoint.clock_offset_s = TTL_S + 30
        resp = httpx.get(url)
        assert resp.status_code == 403 and b"Request has expired" in resp.content
    finally:
        s3_endpoint.clock_offset_s = 0.0


def test_bucket_removed_mid_run_is_503_storage_unavailable(s3_app, s3_endpoint):
    client = s3_endpoint.client()
    for key in s3_endpoint.keys(BUCKET):
        client.delete_object(Bucket=BUCKET, Key=key)
    client.delete_bucket(Bucket=BUCKET)
    try:
        resp = httpx.post(
            f"{s3_app.url}/v1/images/generations",
            json={"model": "dall-e-2", "prompt": "otter", "n": 2, "response_format": "url"},
            headers=AUTH,
            timeout=120,
        )
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "storage_unavailable"
        assert int(resp.headers["retry-after"]) > 0
        assert "url" not in resp.text and s3_endpoint.url not in resp.text
    finally:
        client.create_bucket(Bucket=BUCKET)
    # b64_json does not touch the store, and the store works again once the bucket is back.
    ok = httpx.post(
        f"{s3_app.url}/v1/images/generations",
        json={"model": "dall-e-2", "prompt": "otter", "response_format": "url"},
        headers=AUTH,
        timeout=120,
    )
    assert ok.status_code == 200 and httpx.get(ok.json()["data"][0]["url"]).status_code == 200


def test_sweeper_deletes_expired_images_and_keeps_fresh_ones(s3_client):
    url = s3_client.images.generate(model="dall-e-2", prompt="otter", response_format="url").data[0].url
    name = url.split("?")[0].rsplit("/", 1)[1]
    sweeper = handle("ImageSweeper")
    assert name not in sweeper.sweep.remote(time.time()).result()
    assert httpx.get(url).status_code == 200
    assert name in sweeper.sweep.remote(time.time() + TTL_S + SWEEP_GRACE_S + 5).result()
    assert httpx.get(url).status_code == 404


def test_unreadable_model_is_hidden_and_refused_while_the_others_serve(s3_app, s3_client):
    problem = handle("Denoiser-s3").problem.remote("partial").result()
    assert "s3://models/partial/" in problem and "missing unet/*" in problem
    assert handle("Denoiser-s3").problem.remote("tiny-s3").result() is None
    assert handle("TextEncoder-s3").problem.remote("partial").result() is None

    ids = {m.id for m in s3_client.models.list().data}
    assert ids == {"dall-e-2", "gpt-image-1"}
    resp = httpx.post(
        f"{s3_app.url}/v1/images/generations",
        json={"model": "partial-model", "prompt": "otter"},
        headers=AUTH,
        timeout=120,
    )
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_unavailable"
    assert resp.json()["error"]["param"] == "model"
    assert "s3://" not in resp.text and "unet" not in resp.text  # the cause stays in the server log
    assert s3_client.images.generate(model="gpt-image-1", prompt="otter").data[0].b64_json


def test_public_routes_stay_public_under_a_route_prefix(s3_app):
    assert httpx.get(f"{s3_app.url}/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{s3_app.url}/v1/models").status_code == 401  # a key is needed
