"""What scripts/bench.py and scripts/soak.py share: the application on a
local Ray cluster, started by the project's own builder, and small helpers.

Run those scripts from the project root (``.venv/bin/python scripts/...``):
Ray puts the current directory on its workers' path, so the replicas import
this checkout's ``serve_app``.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

APP_NAME = "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pctl(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (no interpolation)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def serve_config_args(serve_config: Path) -> dict[str, Any]:
    """The ``args:`` of the (first) application in a Serve config file."""
    cfg = yaml.safe_load(Path(serve_config).read_text())
    return dict(cfg["applications"][0]["args"])


def logical_cpus_needed(args: dict[str, Any]) -> int:
    """Ray logical CPUs that the graph's replicas ask for (at their largest
    replica counts), rounded up, and never fewer than the machine's cores."""
    from serve_app.config import load_app_config

    config, registry = load_app_config(args)
    stages = config.stages

    def demand(opts, copies: int = 1) -> float:
        replicas = (opts.autoscaling_config or {}).get("max_replicas") or opts.num_replicas or 1
        return float(opts.ray_actor_options.get("num_cpus", 1)) * replicas * copies

    per_pipeline = sum(demand(s, len(registry.pipelines)) for s in (stages.text_encoder, stages.denoiser, stages.vae_decoder))
    total = per_pipeline + demand(stages.ingress) + demand(stages.post_processor)
    return max(os.cpu_count() or 1, math.ceil(total - 1e-9))


def start_local_graph(args: dict[str, Any], num_cpus: int | None = None) -> str:
    """Start Ray in this process, Serve's HTTP proxy on 127.0.0.1 at a free
    port, and the application built by ``serve_app.app.build_app(args)``;
    returns the base URL (without ``/v1``). ``serve.run`` returns once every
    replica is up, so the first request does not wait for model loading."""
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import use_ray_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The environment the shipped clusters run with (this checkout's or the bundle's configs/).
    use_ray_env(ROOT / "configs" / "ray.env")
    port = free_port()
    # address="local": a cluster of its own, never one that `ray start` left running here.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_local_graph() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
