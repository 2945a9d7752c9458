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


# --- issue 12: the contract as today's SDKs speak it ------------------------------------

def _events(resp) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in resp.text.split("\n\n"):
        if block.strip():
            name = block.split("\n", 1)[0].removeprefix("event: ")
            out.append((name, json.loads(block.split("data: ", 1)[1])))
    return out


# Every current SDK model id, with the cheapest size its family takes.
CHEAPEST_SIZE = {
    "dall-e-2": "256x256",
    "dall-e-3": "1024x1024",
    "gpt-image-1": "1024x1024",
    "gpt-image-1-mini": "1024x1024",
    "gpt-image-1.5": "1024x1024",
    "chatgpt-image-latest": "1024x1024",
    "gpt-image-2": "256x256",
    "gpt-image-2-2026-04-21": "256x256",
    "gpt-image-2.5-sunburst": "256x256",
    "gpt-image-2.5-sunburst-2026-09-08": "256x256",
    "gpt-image-2.5-flare": "256x256",
    "gpt-image-2.5-flare-2026-09-08": "256x256",
    "gpt-image-2.6-sunburst": "256x256",
    "gpt-image-2.6-flare": "256x256",
}


@pytest.fixture(scope="module")
def stub_ingress_client(app_args):
    """The real ingress and post-processor on model stages that compute
    nothing (tests/stub_stages.py): what differs between model ids is the
    ingress's work, and every id is an alias of the one real pipeline that
    the other tests here run."""
    from fastapi.testclient import TestClient

    from tests.conftest import TEST_API_KEY, stub_ingress

    instance = stub_ingress(app_args)
    with TestClient(instance.__serve_build_asgi_app__(), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {TEST_API_KEY}"
        yield client


def test_every_sdk_model_id_is_listed_and_generates(stub_ingress_client):
    import openai.types

    client = stub_ingress_client
    assert set(CHEAPEST_SIZE) == set(openai.types.ImageModel.__args__)
    listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
    for model, size in CHEAPEST_SIZE.items():
        assert model in listed
        resp = client.post(GEN, json={"model": model, "prompt": "otter", "size": size, "response_format": "b64_json"})
        assert resp.status_code == 200, (model, resp.text)
        w, h = map(int, size.split("x"))
        assert Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"]))).size == (w, h), model


def test_response_size_is_one_the_model_advertises(ingress_client):
    listed = {m["id"]: m["sizes"] for m in ingress_client.get("/v1/models").json()["data"]}
    assert listed["dall-e-2"] == ["256x256", "512x512", "1024x1024"]
    assert listed["gpt-image-1"] == ["1024x1024", "1536x1024", "1024x1536", "auto"]
    # The pipeline's 512x512 default is gpt-image-2's `auto`, so it is listed.
    assert listed["gpt-image-2"] == ["1024x1024", "1536x1024", "1024x1536", "512x512", "auto"]
    body = ingress_client.post(GEN, json={"model": "gpt-image-2", "prompt": "otter", "quality": "low"}).json()
    assert body["size"] == "512x512" and body["size"] in listed["gpt-image-2"]


def test_stream_on_dall_e_is_an_event_stream(ingress_client):
    resp = ingress_client.post(GEN, json={"model": "dall-e-2", "prompt": "otter", "size": "256x256", "stream": True, "partial_images": 1})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert "x-ignored-parameters" not in resp.headers
    events = _events(resp)
    assert [name for name, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    done = events[-1][1]
    assert (done["size"], done["quality"], done["background"], done["output_format"]) == ("256x256", "standard", "opaque", "png")
    assert done["usage"]["output_tokens"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(done["b64_json"]))).size == (256, 256)


def test_unknown_model_says_how_to_list_models(ingress_client):
    err = assert_error(ingress_client.post(GEN, json={"model": "image", "prompt": "otter"}), 400, "model", "model_not_found")
    assert "GET /v1/models" in err["message"]


def test_size_error_names_one_cause(ingress_client):
    for size in ("100x100", "1000x1000"):
        err = assert_error(ingress_client.post(GEN, json={"model": "gpt-image-2", "prompt": "otter", "size": size}), 400, "size")
        assert err["message"] == f"Invalid size '{size}' for model 'gpt-image-2': both sides must be multiples of 16."


def _stored_image_path(ingress_client, **body) -> str:
    resp = ingress_client.post(GEN, json={"prompt": "otter", "size": "256x256", "response_format": "url", **body})
    assert resp.status_code == 200, resp.text
    return "/" + resp.json()["data"][0]["url"].split("://", 1)[1].split("/", 1)[1]


def test_head_on_an_image_url_is_get_without_the_body(ingress_client):
    path = _stored_image_path(ingress_client, model="dall-e-2")
    got, head = ingress_client.get(path), ingress_client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"] == "image/png"
    assert int(head.headers["content-length"]) == len(got.content)
    assert head.headers["cache-control"] == got.headers["cache-control"]
    assert ingress_client.head(path.split("?")[0]).status_code == 403


def test_405_names_the_allowed_methods(ingress_client):
    err = assert_error(ingress_client.get(GEN), 405, code="method_not_allowed")
    assert err["type"] == "invalid_request_error"
    assert ingress_client.get(GEN).headers["allow"] == "POST"
    path = _stored_image_path(ingress_client, model="dall-e-2")
    resp = ingress_client.post(path)
    assert resp.status_code == 405 and set(resp.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_svg_output_is_xml_with_an_svg_root(ingress_client):
    from xml.etree import ElementTree

    resp = ingress_client.post(GEN, json={"model": "gpt-image-2", "prompt": "otter", "size": "256x256", "quality": "low", "output_format": "svg"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["output_format"] == "svg"
    root = ElementTree.fromstring(base64.b64decode(body["data"][0]["b64_json"]))
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and (root.get("width"), root.get("height")) == ("256", "256")
    path = _stored_image_path(ingress_client, model="gpt-image-2", quality="low", output_format="svg")
    assert path.split("?")[0].endswith(".svg")
    got = ingress_client.get(path, headers={"Authorization": ""})
    assert got.status_code == 200 and got.headers["content-type"] == "image/svg+xml"
    assert "default-src 'none'" in got.headers["content-security-policy"]
    assert ElementTree.fromstring(got.content).tag == "{http://www.w3.org/2000/svg}svg"
    err = assert_error(ingress_client.post(GEN, json={"model": "gpt-image-2", "prompt": "otter", "output_format": "svg", "n": 2}), 400, "n")
    assert "SVG" in err["message"]
    assert_error(ingress_client.post(GEN, json={"model": "gpt-image-2", "prompt": "otter", "output_format": "svg", "stream": True}), 400, "stream")
    err = assert_error(ingress_client.post(GEN, json={"model": "gpt-image-2", "prompt": "otter", "output_format": "gif"}), 400, "output_format")
    assert "gif" in err["message"]


@pytest.fixture()
def ingress_at(local_stages, monkeypatch):
    """An in-process ingress with config changes, seen from a given peer address."""
    from fastapi.testclient import TestClient

    from serve_app.deployments.ingress import ImagesIngress
    from tests.conftest import TEST_API_KEY, TEST_SIGNING_KEY

    config, registry, pipelines, post = local_stages
    monkeypatch.delenv("IMAGES_API_KEYS", raising=False)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    clients = []

    def make(peer: tuple[str, int], behind_ray_proxy: bool = False, **changes):
        instance = ImagesIngress(config.model_copy(update=changes), registry, TEST_SIGNING_KEY, pipelines, post)
        app = instance.__serve_build_asgi_app__()
        if behind_ray_proxy:
            # What Ray 2.60's HTTP proxy runs in front of the app: uvicorn's
            # proxy-headers middleware with uvicorn's default trusted hosts.
            from uvicorn.config import Config
            from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

            assert Config(app).proxy_headers
            app = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1,::1")
        client = TestClient(app, client=peer, raise_server_exceptions=False)
        client.headers["Authorization"] = f"Bearer {TEST_API_KEY}"
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def _url_base(client, headers: dict[str, str]) -> str:
    resp = client.post(GEN, json={"model": "dall-e-2", "prompt": "otter", "size": "256x256"}, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"][0]["url"].split("/v1/images/files/")[0]


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com"}


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(ingress_at):
    client = ingress_at(("203.0.113.9", 40000), trusted_proxies=["10.0.0.0/8"])
    assert _url_base(client, FORWARDED) == "http://testserver"
    assert _url_base(client, {"Forwarded": 'for=1.2.3.4;proto=https;host="evil.example"'}) == "http://testserver"


def test_forwarded_headers_from_a_trusted_peer_set_the_url(ingress_at):
    client = ingress_at(("10.1.2.3", 40000), trusted_proxies=["10.0.0.0/8"])
    assert _url_base(client, FORWARDED) == "https://images.example.com"
    assert _url_base(client, {"Forwarded": 'for=198.51.100.1;proto=https;host="a.example:8443"'}) == "https://a.example:8443"
    # Only the last value counts: the one the nearest proxy wrote.
    assert _url_base(client, {"X-Forwarded-Host": "client-made.example, images.example.com"}) == "http://images.example.com"
    # A host that is no host name is not used.
    assert _url_base(client, {"X-Forwarded-Host": "bad host/x"}) == "http://testserver"
    # public_base_url wins over any header.
    pinned = ingress_at(("10.1.2.3", 40000), trusted_proxies=["10.0.0.0/8"], public_base_url="https://pinned.example")
    assert _url_base(pinned, FORWARDED) == "https://pinned.example"


def test_forwarded_headers_through_rays_proxy_middleware(ingress_at):
    """Ray's proxy hands a connection from 127.0.0.1 on with the scheme from
    X-Forwarded-Proto and the client from X-Forwarded-For already applied:
    the peer (a proxy on the same host) is still judged by trusted_proxies."""
    headers = {**FORWARDED, "X-Forwarded-For": "198.51.100.7"}
    untrusting = ingress_at(("127.0.0.1", 50000), behind_ray_proxy=True)
    assert _url_base(untrusting, headers) == "http://testserver"
    assert _url_base(untrusting, {"X-Forwarded-Proto": "https"}) == "http://testserver"
    trusting = ingress_at(("127.0.0.1", 50000), behind_ray_proxy=True, trusted_proxies=["127.0.0.1"])
    assert _url_base(trusting, headers) == "https://images.example.com"
    assert _url_base(trusting, {"X-Forwarded-Proto": "https"}) == "https://testserver"
    # A client elsewhere naming a trusted address in X-Forwarded-For gains nothing.
    remote = ingress_at(("198.51.100.7", 50000), behind_ray_proxy=True, trusted_proxies=["127.0.0.1"])
    assert _url_base(remote, {**FORWARDED, "X-Forwarded-For": "127.0.0.1"}) == "http://testserver"
    # Nor one naming its own address and port, which is what a replaced client looks like with a port.
    assert _url_base(remote, {**FORWARDED, "X-Forwarded-For": "198.51.100.7:50000"}) == "http://testserver"


@pytest.mark.parametrize("size, expected", [("1024x1024", (272, 1056, 4160)), ("1024x1536", (408, 1584, 6240)), ("1536x1024", (400, 1568, 6208))])
def test_usage_for_three_tiers(stub_ingress_client, size, expected):
    """OpenAI's output-token table, size by tier (the ingress's arithmetic;
    the stand-in text encoder counts words)."""
    prompt = "A cute baby sea otter"
    for quality, out in zip(("low", "medium", "high"), expected):
        resp = stub_ingress_client.post(GEN, json={"model": "gpt-image-1", "prompt": prompt, "size": size, "quality": quality, "output_format": "jpeg"})
        assert resp.status_code == 200, resp.text
        u = resp.json()["usage"]
        assert u["input_tokens_details"] == {"text_tokens": 5, "image_tokens": 0}
        assert u["output_tokens"] == out and u["total_tokens"] == 5 + out
