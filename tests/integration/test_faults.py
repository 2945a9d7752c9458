"""Faults on the real Ray Serve graph: dead replicas, overload, redeploys,
start-up, a model that goes bad.

Most of these run a second application, ``images-faults`` at /faults, built by
the real builder with stub model stages that sleep instead of computing
(tests/stub_stages.py): every Serve mechanism is real, and a burst of dozens
of requests costs no CPU. The health-check test breaks the real tiny model
of the session's own application.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from serve_app.deployments.stage_handles import running_replicas
from tests.conftest import TEST_API_KEY
from tests.stub_stages import stub_model_stages

pytestmark = pytest.mark.ray

APP = "images-faults"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
STEP_S = 0.25  # 4 steps (the tiny model's default): a request denoises for ~1 s
DECODE_S = 0.4
BODY = {"model": "dall-e-2", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"}


def fault_stages(denoisers: int = 2, vae_decoders: int = 2) -> dict:
    small = {"ray_actor_options": {"num_cpus": 0.05}}
    return {
        "ingress": {**small, "max_ongoing_requests": 100},
        "text_encoder": {**small, "num_replicas": 1},
        # Four calls per replica and eight more queued in each caller: beyond that, back-pressure.
        # One replica alone can still hold the 8 requests of the kill test.
        "denoiser": {**small, "num_replicas": denoisers, "max_ongoing_requests": 4, "max_queued_requests": 8},
        "vae_decoder": {**small, "num_replicas": vae_decoders, "max_ongoing_requests": 4},
        "post_processor": {**small, "max_ongoing_requests": 16},
    }


def deploy(app_args, denoisers: int = 2) -> None:
    from ray import serve

    from serve_app.app import build_graph

    args = {**app_args, "max_concurrent_requests": 20, "stages": fault_stages(denoisers)}
    serve.run(build_graph(args, model_stages=stub_model_stages(STEP_S, DECODE_S)), name=APP, route_prefix="/faults")


@pytest.fixture(scope="module")
def faults_app(service_url, app_args):
    from ray import serve

    deploy(app_args)
    yield SimpleNamespace(url=f"{service_url}/faults", args=app_args)
    serve.delete(APP)


# One client for all threads: making an httpx client per request costs tens
# of milliseconds of CPU (an SSL context each), which 40 threads queue up for.
HTTP = httpx.Client(limits=httpx.Limits(max_connections=64), headers=AUTH)


def post(url: str, timeout: float = 120) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    r = HTTP.post(f"{url}/v1/images/generations", json=BODY, timeout=timeout)
    return r.status_code, r.json(), dict(r.headers), time.monotonic() - started


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Actor names of the deployment's live replicas."""
    import ray

    # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id> (no dashboard needed to list them).
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def wait_for_replicas(app: str, deployment: str, count: int, timeout: float = 60) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_replicas(serve.status().applications[app].deployments[deployment]) == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{deployment} did not get back to {count} running replicas")


@pytest.mark.parametrize("stage", ["Denoiser-tiny-sd", "VaeDecoder-tiny-sd"])
def test_killing_a_replica_mid_request_loses_nothing(faults_app, stage):
    """2 replicas of the stage, 8 requests in flight, one replica killed: every
    request is answered, with 200 (retried on the other replica) or 503
    stage_unavailable with Retry-After; never a 500 or a dropped connection."""
    import ray

    wait_for_replicas(APP, stage, 2)
    victim = replica_actor_names(APP, stage)[0]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, faults_app.url) for _ in range(8)]
        # The denoiser is working on the first requests by now (each denoises
        # ~1 s and decodes 0.4 s); for the VAE, the first decodes start after ~1 s.
        time.sleep(1.2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]  # a dropped connection raises here
    statuses = sorted(status for status, *_ in results)
    for status, body, headers, _ in results:
        assert status in (200, 503), (status, body)
        if status == 503:
            assert body["error"]["code"] == "stage_unavailable" and "retry-after" in headers
        else:
            assert len(body["data"]) == 1
    assert statuses.count(200) >= 6, statuses
    wait_for_replicas(APP, stage, 2)


def test_a_burst_beyond_capacity_gets_fast_429s_and_the_rest_complete(faults_app):
    """40 requests at once against an ingress admitting 20 and a denoiser that
    holds 2x4 ongoing + 8 queued: each answer is a 200 or a 429 in the
    envelope with Retry-After (from either limit), and the 429s come at
    once, not after a wait."""
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda _: post(faults_app.url), range(40)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 40, sorted(r[0] for r in results)
    assert len(ok) >= 8 and len(refused) >= 20, (len(ok), len(refused))
    for _, body, headers, _ in refused:
        assert body["error"]["type"] == "server_overloaded" and body["error"]["code"] == "server_overloaded"
        assert int(headers["retry-after"]) > 0
    # Which limit refuses is timing: the ingress's admission always does (20
    # of 40); the denoiser's queue only when enough admitted requests reach it
    # at once, which one CI run did not see. Its 429 mapping is unit-tested
    # (tests/unit/test_stage_failures.py).
    assert any("ingress" in body["error"]["message"] for _, body, _, _ in refused)
    # An admitted request sleeps 1.4 s in the stages; a refusal waits for no
    # work (measured here: ingress refusals ~0.5 s, back-pressure ~1.1 s,
    # the first success ~2.7 s, with all 40 connections arriving at once).
    slowest_refusal = max(seconds for *_, seconds in refused)
    fastest_success = min(seconds for *_, seconds in ok)
    assert fastest_success > 1.4 and slowest_refusal < fastest_success, (slowest_refusal, fastest_success)


def test_scaling_down_under_traffic_finishes_in_flight_requests(faults_app):
    """Redeploy with one denoiser instead of two while 8 requests are in
    flight: Serve lets the replicas it stops finish their work."""
    wait_for_replicas(APP, "Denoiser-tiny-sd", 2)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, faults_app.url) for _ in range(8)]
        time.sleep(0.5)
        deploy(faults_app.args, denoisers=1)
        results = [f.result() for f in futures]
    assert [status for status, *_ in results] == [200] * 8, [(s, b) for s, b, *_ in results if s != 200]
    wait_for_replicas(APP, "Denoiser-tiny-sd", 1)
    assert post(faults_app.url)[0] == 200


def test_requests_during_startup_get_503_model_not_ready(service_url, app_args):
    """Ray routes to the ingress as soon as it runs, while the model stages may
    still be loading; those requests get 503 model_not_ready with Retry-After
    at once (not a hang), and the same request succeeds once they are up."""
    from ray import serve

    from serve_app.app import build_graph

    name, url = "images-startup", f"{service_url}/startup"
    app = build_graph({**app_args, "stages": fault_stages(1, 1)}, model_stages=stub_model_stages(0.01, 0.01, load_s=8))
    deploying = threading.Thread(target=serve.run, args=(app,), kwargs={"name": name, "route_prefix": "/startup"})
    deploying.start()
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # Until the ingress replica itself runs, Ray's proxy holds the request.
            status, body, headers, seconds = post(url, timeout=30)
            if status == 404 and not seen:  # the route is not there yet: the session app at / answers
                time.sleep(0.2)
                continue
            seen.append(status)
            if status == 200:
                break
            assert status == 503 and body["error"]["code"] == "model_not_ready", (status, body)
            # The first answer may wait while Ray starts the ingress replica
            # itself (its proxy holds the request); after that, no waiting.
            assert headers["retry-after"] and (len(seen) == 1 or seconds < 2.0), (seen, seconds)
            health = httpx.get(f"{url}/health", timeout=5)
            assert health.status_code in (200, 503)
            time.sleep(0.5)
        assert len(seen) >= 3 and seen[0] == 503 and seen[-1] == 200, seen
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        deploying.join(60)
        serve.delete(name)


def test_a_model_gone_bad_is_replaced_through_its_health_check(service_url, client):
    """The fault switch turns every weight of the session app's denoiser into
    NaN; its check_health runs a real UNet forward pass, fails, and Ray replaces
    the replica with one that loads the model afresh."""
    from ray import serve

    denoiser = serve.get_deployment_handle("Denoiser-tiny-sd", app_name="images")
    before = denoiser.describe.remote().result()["pid"]
    denoiser.inject_fault.remote().result()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            if denoiser.describe.remote().result(timeout_s=10)["pid"] != before:
                break
        except Exception:  # noqa: BLE001 - the old replica is being stopped
            continue
    else:
        raise AssertionError("the broken denoiser replica was not replaced")
    assert len(client.images.generate(model="dall-e-2", prompt="after repair", size="256x256").data) == 1
