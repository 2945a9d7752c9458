"""The HTTP contract of the ingress, in-process: validation, errors, auth, body limit, URLs."""

from __future__ import annotations

import base64
import json
import io

import pytest
from PIL import Image

GEN = "/v1/images/generations"


def assert_error(resp, status: int, param=None, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    assert resp.headers.get("x-request-id")
    return body["error"]


@pytest.mark.parametrize(
    "payload, param",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x" * 32001}, "prompt"),
        ({"prompt": "otter", "n": 0}, "n"),
        ({"prompt": "otter", "n": 11}, "n"),
        ({"prompt": "otter", "n": "3"}, "n"),
        ({"prompt": "otter", "n": 2.5}, "n"),
        ({"prompt": "otter", "n": 10**30}, "n"),
        ({"prompt": "otter", "size": "13x13"}, "size"),
        ({"prompt": "otter", "size": 512}, "size"),
        ({"prompt": "otter", "response_format": "gif"}, "response_format"),
        ({"prompt": "otter", "output_format": "bmp"}, "output_format"),
        ({"prompt": "otter", "output_compression": 101}, "output_compression"),
        ({"prompt": "otter", "output_compression": -1}, "output_compression"),
        ({"prompt": "otter", "quality": "ultra"}, "quality"),
        ({"prompt": "otter", "style": "cartoon"}, "style"),
        ({"prompt": "otter", "user": 7}, "user"),
        ({"prompt": "otter", "seed": -1}, "seed"),
        ({"prompt": "otter", "model": "dall-e-9"}, "model"),
        ({"prompt": "otter", "model": 3}, "model"),
    ],
)
def test_invalid_request_is_400_naming_the_parameter(ingress_client, payload, param):
    assert_error(ingress_client.post(GEN, json=payload), 400, param)


@pytest.mark.parametrize("body", [b"{bad json", b"[1, 2]", b"null", b"", b'"prompt"'])
def test_malformed_body_is_400(ingress_client, body):
    resp = ingress_client.post(GEN, content=body, headers={"content-type": "application/json"})
    assert_error(resp, 400)


def test_unknown_route_and_method_are_enveloped(ingress_client):
    assert_error(ingress_client.get("/v1/nope"), 404)
    assert_error(ingress_client.get(GEN), 405)


def test_body_over_limit_is_413(ingress_client):
    limit = ingress_client.instance.config.max_body_bytes
    resp = ingress_client.post(GEN, json={"prompt": "x" * (limit + 10)})
    assert_error(resp, 413, code="request_too_large")


def test_chunked_body_over_limit_is_413(ingress_client):
    limit = ingress_client.instance.config.max_body_bytes

    def chunks():
        yield b'{"prompt": "'
        for _ in range(limit // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    resp = ingress_client.post(GEN, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_error(resp, 413, code="request_too_large")


def test_missing_or_wrong_key_is_401(ingress_client):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        resp = ingress_client.post(GEN, json={"prompt": "otter"}, headers=headers)
        assert_error(resp, 401, code="invalid_api_key")
        assert resp.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_key(ingress_client):
    resp = ingress_client.get("/health", headers={"Authorization": ""})
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_models_list_is_openai_shaped(ingress_client):
    body = ingress_client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert {"dall-e-2", "dall-e-3", "gpt-image-1", "tiny-sd"} <= set(ids)
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]


def test_b64_generation_and_request_id(ingress_client):
    resp = ingress_client.post(GEN, json={"prompt": "otter", "size": "256x256", "response_format": "b64_json", "seed": 3})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"]
    body = resp.json()
    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert img.size == (256, 256) and img.format == "PNG"
    assert body["data"][0]["seed"] == 3


def test_generation_aliases_route_to_the_same_handler(ingress_client):
    for path in ("/images/generations", "/api/images/generations"):
        resp = ingress_client.post(path, json={"prompt": "otter", "size": "256x256", "response_format": "b64_json"})
        assert resp.status_code == 200, resp.text


def test_internal_error_is_generic_500(ingress_client, monkeypatch):
    async def boom(*args, **kwargs):
        raise RuntimeError("secret /etc/passwd detail")

    import serve_app.deployments.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "generate", boom)
    resp = ingress_client.post(GEN, json={"prompt": "otter"})
    err = assert_error(resp, 500)
    assert "secret" not in resp.text and "passwd" not in resp.text and "Traceback" not in resp.text
    assert resp.headers["x-request-id"] in err["message"]


def test_url_is_signed_and_served_without_a_key(ingress_client):
    resp = ingress_client.post(GEN, json={"prompt": "otter", "size": "256x256", "response_format": "url", "output_format": "webp"})
    url = resp.json()["data"][0]["url"]
    path = url.split("://", 1)[1].split("/", 1)[1]
    got = ingress_client.get("/" + path, headers={"Authorization": ""})
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got.content)).size == (256, 256)
    tampered = "/" + path[:-1] + ("0" if path[-1] != "0" else "1")
    assert_error(ingress_client.get(tampered), 403, code="invalid_signature")
    assert_error(ingress_client.get("/" + path.split("?")[0]), 403)


def test_signed_url_for_unknown_image_is_404(ingress_client):
    name = "A" * 32 + ".png"
    expires, sig = ingress_client.instance.signer.sign(name)
    assert_error(ingress_client.get(f"/v1/images/files/{name}?expires={expires}&sig={sig}"), 404)


def test_one_failed_write_is_503_and_leaves_no_image_behind(local_stages, s3_endpoint, monkeypatch):
    """n=3 on an S3 store whose second write fails: the request is a 503 with
    Retry-After, no URL, and the images written before the failure are gone."""
    import itertools

    from fastapi.testclient import TestClient

    from serve_app.deployments.ingress import ImagesIngress
    from serve_app.deployments.post_processor import PostProcessor
    from serve_app.storage import StorageError
    from tests.conftest import TEST_API_KEY, TEST_SIGNING_KEY, LocalHandle

    config, registry, pipelines, _ = local_stages
    s3_endpoint.client().create_bucket(Bucket="flaky")
    config = config.model_copy(update={"image_store": "s3://flaky/img", "image_store_options": s3_endpoint.storage_options})
    post = PostProcessor(config)
    calls, real_put = itertools.count(), post.store.put

    def flaky_put(data: bytes, ext: str) -> str:
        if next(calls) == 1:
            raise StorageError("simulated write failure")
        return real_put(data, ext)

    monkeypatch.setattr(post.store, "put", flaky_put)
    monkeypatch.delenv("IMAGES_API_KEYS", raising=False)
    ingress = ImagesIngress(config, registry, TEST_SIGNING_KEY, pipelines, LocalHandle(post))
    with TestClient(ingress.__serve_build_asgi_app__(), raise_server_exceptions=False) as client:
        resp = client.post(
            GEN,
            json={"prompt": "otter", "n": 3, "size": "256x256", "response_format": "url"},
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        )
    err = assert_error(resp, 503, code="storage_unavailable")
    assert err["type"] == "server_error" and int(resp.headers["retry-after"]) > 0
    assert next(calls) == 3  # all three writes were attempted, two of them stored
    assert s3_endpoint.keys("flaky") == []


def test_images_are_removed_when_their_urls_cannot_be_made(ingress_client, monkeypatch):
    store = ingress_client.instance.store
    before = set(store.fs.ls(store.root, detail=False))

    def no_url(name, ttl_s):
        raise RuntimeError("cannot presign")

    monkeypatch.setattr(store, "url_for", no_url)
    resp = ingress_client.post(GEN, json={"prompt": "otter", "n": 2, "size": "256x256", "response_format": "url"})
    assert_error(resp, 500)
    assert set(store.fs.ls(store.root, detail=False)) == before


def test_an_error_after_the_stream_started_is_sent_in_stream(ingress_client, monkeypatch):
    import serve_app.deployments.ingress as ingress_module
    from serve_app.protocol import PartialImageEvent

    async def half_stream(r, stages):
        yield PartialImageEvent(b64_json="AAAA", created_at=1, size=r.size, quality=r.quality, background=r.background, output_format="png", partial_image_index=0)
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(ingress_module, "generate_stream", half_stream)
    resp = ingress_client.post(GEN, json={"prompt": "otter", "model": "gpt-image-1", "stream": True, "partial_images": 1})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [block for block in resp.text.split("\n\n") if block.strip()]
    assert events[0].startswith("event: image_generation.partial_image")
    data = json.loads(events[-1].split("data: ", 1)[1])
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["type"] == "server_error"
    assert "secret" not in resp.text
