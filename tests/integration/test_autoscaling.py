"""Per-stage autoscaling on the real graph under a load ramp.

A third application, ``images-autoscale`` at /autoscale, is built by the real
builder with the sleeping model stages of tests/stub_stages.py and the
autoscaling targets of the shipped profile (configs/serve_config.autoscale.yaml),
with only its time constants shortened so that a test sees a scale-up and a
scale-down in seconds. Replica counts come from Serve's own status.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.deployments.stage_handles import running_replicas
from tests.conftest import TEST_API_KEY
from tests.stub_stages import stub_model_stages

pytestmark = pytest.mark.ray

APP = "images-autoscale"
ROOT = Path(__file__).resolve().parents[2]
STEP_S = 0.1  # 4 steps: a batch denoises for 0.4 s
BODY = {"model": "dall-e-2", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"}
# Seconds instead of the profile's minutes; metrics_interval_s is how often
# handles report their ongoing requests to the controller (Ray's default 10 s).
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0}


def autoscale_stages() -> dict:
    """The shipped profile's stages: its targets, at most 2 replicas, tiny CPU asks, fast reactions."""
    shipped = yaml.safe_load((ROOT / "configs" / "serve_config.autoscale.yaml").read_text())
    stages = shipped["applications"][0]["args"]["stages"]
    for options in stages.values():
        options["ray_actor_options"] = {"num_cpus": 0.05}
        if "autoscaling_config" in options:
            options["autoscaling_config"] = {**options["autoscaling_config"], **FAST, "max_replicas": 2}
    stages["denoiser"]["graceful_shutdown_timeout_s"] = 10
    return stages


@pytest.fixture(scope="module")
def autoscale_url(service_url, app_args):
    from ray import serve

    from serve_app.app import build_graph

    args = {**app_args, "stages": autoscale_stages()}
    serve.run(build_graph(args, model_stages=stub_model_stages(STEP_S, 0.02)), name=APP, route_prefix="/autoscale")
    yield f"{service_url}/autoscale"
    serve.delete(APP)


def replica_count(deployment: str) -> int:
    from ray import serve

    return running_replicas(serve.status().applications[APP].deployments[deployment])


class Load:
    """``concurrency`` clients sending one request after another until stopped;
    records (status, started, finished) of each."""

    def __init__(self, url: str, concurrency: int):
        self.url, self.results, self.stopped = url, [], threading.Event()
        self.http = httpx.Client(headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=60)
        self.pool = ThreadPoolExecutor(concurrency)
        self.futures = [self.pool.submit(self._client) for _ in range(concurrency)]

    def _client(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            r = self.http.post(f"{self.url}/v1/images/generations", json=BODY)
            self.results.append((r.status_code, started, time.monotonic(), r.text[:300]))

    def stop(self) -> list[tuple]:
        self.stopped.set()
        for f in self.futures:
            f.result()  # a dropped connection raises here
        self.pool.shutdown()
        self.http.close()
        return self.results


def watch(seconds: float, until, counts: dict[str, list[int]]) -> float | None:
    """Samples both stages' running replicas every 0.25 s until ``until(counts)``; the time it held, or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for deployment in counts:
            counts[deployment].append(replica_count(deployment))
        if until(counts):
            return time.monotonic()
        time.sleep(0.25)
    return None


def test_denoiser_scales_up_under_load_and_down_after_it_losing_nothing(autoscale_url):
    """Ramp to 8 concurrent clients: the denoiser (2 ongoing per replica)
    goes from 1 to 2 replicas while the text encoder (16 per replica, 7 ms a
    prompt on a CPU) stays at 1. Back to one client: the denoiser returns to
    1 replica, and every request, those in flight on the stopped replica
    included, is answered 200."""
    denoiser, encoder = "Denoiser-tiny-sd", "TextEncoder-tiny-sd"
    counts: dict[str, list[int]] = {denoiser: [], encoder: []}
    assert replica_count(denoiser) == 1 and replica_count(encoder) == 1

    heavy = Load(autoscale_url, 8)
    try:
        scaled_up = watch(45, lambda c: c[denoiser][-1] >= 2, counts)
        # A moment at 2 replicas, so both take requests before the load drops.
        time.sleep(1.0)
    finally:
        ramp = heavy.stop()
    assert scaled_up, f"the denoiser did not scale up: {counts[denoiser][-5:]}"
    assert max(counts[encoder]) == 1, counts[encoder]

    light = Load(autoscale_url, 1)
    try:
        scaled_down = watch(45, lambda c: c[denoiser][-1] == 1, counts)
        time.sleep(1.0)  # requests that were in flight on the stopped replica finish
    finally:
        tail = light.stop()
    assert scaled_down, f"the denoiser did not scale down: {counts[denoiser][-5:]}"
    assert max(counts[encoder]) == 1, counts[encoder]

    results = ramp + tail
    failed = [(status, text) for status, _, _, text in results if status != 200]
    assert not failed, failed[:5]
    # The scale-down happened under traffic: a request straddled it.
    assert any(started < scaled_down < finished for _, started, finished, _ in tail), "no request was in flight at the scale-down"
    assert len(ramp) >= 16 and len(tail) >= 2, (len(ramp), len(tail))
