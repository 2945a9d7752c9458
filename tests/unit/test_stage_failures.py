"""Ray failures of stage calls become OpenAI errors; a dead replica is retried once; deadlines give 504."""

from __future__ import annotations

import asyncio

import numpy as np
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


def _slow_stream(seconds: float):
    async def stream(*args, **kwargs):
        await asyncio.sleep(seconds)
        return
        yield  # makes this an async generator that ends without events

    return stream


def test_a_stream_past_the_deadline_ends_with_a_504_error_event(ingress_client, monkeypatch):
    import serve_app.deployments.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "generate_stream", _slow_stream(5))
    monkeypatch.setattr(ingress_client.instance.config, "request_deadline_s", 0.2)
    resp = ingress_client.post("/v1/images/generations", json={"model": "gpt-image-1", "prompt": "otter", "stream": True})
    assert resp.status_code == 200
    event, data = resp.text.strip().split("\n")
    assert event == "event: error" and '"code": "deadline_exceeded"' in data
    assert ingress_client.instance.in_flight == 0  # the stream gave its slot back


def test_a_running_stream_holds_an_admission_slot(ingress_client, monkeypatch):
    import serve_app.deployments.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "generate_stream", _slow_stream(1.5))
    monkeypatch.setattr(ingress_client.instance.config, "max_concurrent_requests", 1)
    body = {"model": "gpt-image-1", "prompt": "otter", "stream": True}
    from concurrent.futures import ThreadPoolExecutor
    import time

    with ThreadPoolExecutor(1) as ex:
        first = ex.submit(ingress_client.post, "/v1/images/generations", json=body)
        time.sleep(0.5)
        second = ingress_client.post("/v1/images/generations", json=body)
        first.result()
    assert second.status_code == 429 and second.json()["error"]["code"] == "server_overloaded"
    assert ingress_client.instance.in_flight == 0


def test_no_retry_when_no_replica_is_left():
    """A replica lost with its node, and no node to hold another: 503 at once, not a wait in Serve's queue."""
    call, calls = failing(ActorDiedError())

    async def none_left():
        return 0

    with pytest.raises(OpenAIError) as e:
        run(call_stage("denoiser", call, none_left))
    assert e.value.status == 503 and e.value.code == "stage_unavailable" and e.value.headers["Retry-After"]
    assert len(calls) == 1

    async def one_left():
        return 1

    call, calls = failing(ActorDiedError())
    assert run(call_stage("denoiser", call, one_left)) == "ok" and len(calls) == 2

    async def unknown():
        raise RuntimeError("controller unreachable")

    call, calls = failing(ActorDiedError())
    assert run(call_stage("denoiser", call, unknown)) == "ok" and len(calls) == 2


def test_a_retry_waiting_for_a_replica_is_cancelled_once_none_is_left(monkeypatch):
    """The controller still counts the lost replica when the first call
    fails, so the retry is sent; it waits in Serve's queue (no replica to
    run it) until the controller reports none left: then 503, and the
    queued retry is cancelled."""
    import asyncio

    from serve_app.deployments import stage_handles

    monkeypatch.setattr(stage_handles, "RETRY_WATCH_S", 0.02)
    calls, cancelled = [], []

    async def call():
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()
        try:
            await asyncio.sleep(60)  # queued: no replica will ever take it
        except asyncio.CancelledError:
            cancelled.append(1)
            raise

    answers = iter([1, 1, 1, 0])  # asked after the failure, then while the retry waits

    async def left():
        return next(answers)

    with pytest.raises(OpenAIError) as e:
        run(asyncio.wait_for(call_stage("denoiser", call, left), 5))
    assert e.value.status == 503 and e.value.code == "stage_unavailable" and e.value.headers["Retry-After"]
    assert len(calls) == 2 and cancelled == [1]


def test_an_architecture_that_cannot_edit_is_a_400_on_model():
    from serve_app.deployments.stage_handles import HandleStages
    from serve_app.pipeline.types import EditsUnsupported
    from tests.conftest import LocalHandle

    class NoEdits:
        def encode(self, pixels, alpha=None, references=None, pipeline=None):
            raise EditsUnsupported("no")

    stages = HandleStages("p", None, None, LocalHandle(NoEdits()), None)
    with pytest.raises(OpenAIError) as e:
        run(stages.encode_image(np.zeros((8, 8, 3), np.uint8), None))
    assert e.value.status == 400 and e.value.param == "model"
