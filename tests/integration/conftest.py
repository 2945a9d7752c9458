"""The real application on a real local Ray cluster, once per session."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import TEST_API_KEY

STAGE_OPTIONS = {
    "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
    "text_encoder": {"ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 2},
    # Health-checked every second, with the fault switch on (tests/integration/test_faults.py).
    "denoiser": {"ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 2, "health_check_period_s": 1, "fault_injection": True},
    "vae_decoder": {"ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 2},
    "post_processor": {"ray_actor_options": {"num_cpus": 0.1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from serve_app.config import use_ray_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_ray_env()  # configs/ray.env, as the shipped clusters run
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def image_server():
    """A local HTTP server on 127.0.0.1 serving test images (tests.image_server)."""
    from tests.image_server import ImageServer

    server = ImageServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_url(ray_cluster, app_args, image_server) -> str:
    """Base URL of the app built by the real builder and run by serve.run. It
    may fetch image URLs from the test's image server, and only from it: the
    in-process ingress of the unit tests has no such allowance."""
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    fetch = {"allowed_hosts": [image_server.host], "allowed_networks": ["127.0.0.1/32"], "timeout_s": 5}
    serve.run(build_app({**app_args, "stages": STAGE_OPTIONS, "image_fetch": fetch}), name="images", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def client(service_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{service_url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=120)
