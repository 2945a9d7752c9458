"""Per-key rate limits are shared by all ingress replicas (the RateLimiter deployment)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import TEST_API_KEY
from tests.stub_stages import stub_model_stages

pytestmark = pytest.mark.ray


def test_two_ingress_replicas_count_against_one_window(service_url, app_args):
    from ray import serve

    from serve_app.app import build_graph

    small = {"ray_actor_options": {"num_cpus": 0.05}}
    stages = {name: dict(small) for name in ("text_encoder", "denoiser", "vae_decoder", "post_processor")}
    stages["ingress"] = {**small, "num_replicas": 2}
    args = {**app_args, "rate_limits": {"requests_per_minute": 3}, "stages": stages}
    serve.run(build_graph(args, model_stages=stub_model_stages(0.05, 0.01)), name="images-limits", route_prefix="/limits")
    try:
        body = {"model": "dall-e-2", "prompt": "otter", "size": "256x256"}
        with httpx.Client(headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=60) as http:
            with ThreadPoolExecutor(8) as pool:
                statuses = list(
                    pool.map(lambda _: http.post(f"{service_url}/limits/v1/images/generations", json=body).status_code, range(8))
                )
        # Each replica keeping its own window would admit up to 3 per replica.
        assert sorted(statuses) == [200] * 3 + [429] * 5, statuses
    finally:
        serve.delete("images-limits")
