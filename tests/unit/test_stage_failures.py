"""Ray failures of stage calls become OpenAI errors; a dead replica is retried once; deadlines give 504."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from serve_app.deployments.stage_handles import call_stage
from serve_app.errors import OpenAIError


def run(coro):
    return asyncio.run(coro)


def failing(*errors, result="ok"):
    calls = []

    async def call():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return call, calls


def test_a_dead_replica_is_retried_once():
    call, calls = failing(ActorDiedError())
    assert run(call_stage("denoiser", call)) == "ok" and len(calls) == 2


def test_two_failures_are_503_with_retry_after():
    call, calls = failing(ActorDiedError(), ActorDiedError())
    with pytest.raises(OpenAIError) as e:
        run(call_stage("denoiser", call))
    assert e.value.status == 503 and e.value.code == "stage_unavailable" and e.value.headers["Retry-After"]
    assert len(calls) == 2


def test_backpressure_is_429_at_once():
    call, calls = failing(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    with pytest.raises(OpenAIError) as e:
        run(call_stage("denoiser", call))
    assert e.value.status == 429 and e.value.type == "server_overloaded" and e.value.headers["Retry-After"]
    assert len(calls) == 1


def test_other_errors_pass_through_unretried():
    call, calls = failing(ValueError("bug"))
    with pytest.raises(ValueError):
        run(call_stage("denoiser", call))
    assert len(calls) == 1


def test_deadline_gives_504_that_should_not_be_retried(ingress_client, monkeypatch):
    import serve_app.deployments.ingress as ingress_module

    async def slow(*args, **kwargs):
        await asyncio.sleep(5)

    monkeypatch.setattr(ingress_module, "generate", slow)
    monkeypatch.setattr(ingress_client.instance.config, "request_deadline_s", 0.2)
    resp = ingress_client.post("/v1/images/generations", json={"prompt": "otter"})
    assert resp.status_code == 504 and resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["code"] == "deadline_exceeded"
