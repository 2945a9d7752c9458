"""Overload, hostile paths and log hygiene on the in-process ingress."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TEST_API_KEY

GEN = "/v1/images/generations"


def test_past_the_concurrency_limit_is_a_fast_429(ingress_client, monkeypatch):
    import serve_app.deployments.ingress as ingress_module

    async def slow(*args, **kwargs):
        await asyncio.sleep(1.5)
        raise AssertionError("not reached in this test's second request")

    monkeypatch.setattr(ingress_module, "generate", slow)
    monkeypatch.setattr(ingress_client.instance.config, "max_concurrent_requests", 1)
    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(ingress_client.post, GEN, json={"prompt": "otter"})
        import time

        time.sleep(0.5)
        started = time.monotonic()
        second = ingress_client.post(GEN, json={"prompt": "otter"})
        took = time.monotonic() - started
        first.result()
    assert second.status_code == 429 and second.headers["retry-after"]
    assert second.json()["error"]["type"] == "server_overloaded"
    assert took < 1.0  # answered at once, not after the first request finished
    assert ingress_client.instance.in_flight == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/files/..%2F..%2Fetc%2Fpasswd",
        "/v1/images/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/images/files/%2Fetc%2Fpasswd",
        "/v1/images/files/../../etc/passwd",
        "/v1/images/files/..%5C..%5Cwindows",
    ],
)
def test_path_traversal_is_refused(ingress_client, path):
    signer = ingress_client.instance.signer
    for suffix in ("", "?expires=9999999999&sig=" + "0" * 64):
        resp = ingress_client.get(path + suffix, headers={"Authorization": ""})
        assert resp.status_code in (401, 403, 404), (path, resp.status_code)  # 401: the client normalised it out of /v1/images/files/
        assert "root:" not in resp.text
    # Even a correctly signed traversal name reads nothing outside the store.
    name = path.rsplit("/", 1)[1]
    expires, sig = signer.sign(name)
    resp = ingress_client.get(f"{path}?expires={expires}&sig={sig}")
    assert resp.status_code in (401, 403, 404) and "root:" not in resp.text


def test_a_signature_for_one_image_does_not_open_another(ingress_client):
    a, b = "A" * 32 + ".png", "B" * 32 + ".png"
    expires, sig = ingress_client.instance.signer.sign(a)
    resp = ingress_client.get(f"/v1/images/files/{b}?expires={expires}&sig={sig}")
    assert resp.status_code == 403


def test_logs_hold_no_key_prompt_or_user(ingress_client, caplog):
    prompt = "a very secret prompt about an otter named Bartholomew"
    with caplog.at_level(logging.DEBUG, logger="serve_app"):
        ingress_client.post(GEN, json={"prompt": prompt, "size": "256x256", "user": "alice@example.com", "response_format": "b64_json"})
        ingress_client.post(GEN, json={"prompt": prompt}, headers={"Authorization": "Bearer wrong-key-123"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "request" in text  # something was logged
    for secret in ("Bartholomew", "alice@example.com", TEST_API_KEY, "wrong-key-123"):
        assert secret not in text


def test_a_request_breaking_the_model_rules_is_400_even_under_overload(ingress_client, monkeypatch):
    monkeypatch.setattr(ingress_client.instance, "in_flight", ingress_client.instance.config.max_concurrent_requests)
    resp = ingress_client.post(GEN, json={"model": "dall-e-3", "prompt": "otter", "n": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
    ok_but_full = ingress_client.post(GEN, json={"model": "dall-e-3", "prompt": "otter"})
    assert ok_but_full.status_code == 429


def test_unknown_field_names_are_percent_encoded_in_the_header(ingress_client):
    # A name outside Latin-1 cannot go in a header as it is: it was a 500.
    fields = {"\U0008eb3d\r\nx": 1, "a,b": 2, "é": 3}
    resp = ingress_client.post(GEN, json={"prompt": "otter", "size": "256x256", "response_format": "b64_json", **fields})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ignored-parameters"] == "a%2Cb,%C3%A9,%F2%8E%AC%BD%0D%0Ax"
    # Thousands of unknown fields make a bounded header, not a huge one.
    many = {f"field_{i:04d}": 1 for i in range(2000)}
    resp = ingress_client.post(GEN, json={"prompt": "otter", "size": "256x256", "response_format": "b64_json", **many})
    assert resp.status_code == 200 and 0 < len(resp.headers["x-ignored-parameters"]) <= 1024


def test_a_lone_surrogate_in_a_value_is_a_400(ingress_client):
    # JSON lets a client send "\udc00"; quoted back in the error message it
    # could not be encoded as UTF-8, and the 400 became a 500.
    resp = ingress_client.post(GEN, content=rb'{"prompt": "otter", "model": "\udc00"}', headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "model"
