"""The shipped configs' malloc settings reach the post-processor's process, and glibc obeys them.

glibc reads MALLOC_* when the process starts, so setting them from Python in
a running replica would do nothing: they must come through Ray's
runtime_env, which Serve hands, with the rest of ray_actor_options, to the
replica's actor. This starts an actor with exactly those options.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class AllocatorReport:
    def report(self, threads: int) -> dict:
        import threading

        import numpy as np

        from serve_app import allocator

        exec_env = dict(kv.split("=", 1) for kv in Path("/proc/self/environ").read_text().split("\0") if "=" in kv)
        barrier = threading.Barrier(threads)

        def work():  # threads allocating at once: without a limit glibc gives each its own arena
            barrier.wait()
            for _ in range(100):
                np.ones(300_000).sum()

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return {"env": {k: v for k, v in exec_env.items() if k.startswith("MALLOC_")}, **allocator.stats()}


@pytest.mark.parametrize("config", ["serve_config.yaml", "configs/serve_config.gpu.yaml"])
def test_the_post_processor_starts_with_the_shipped_malloc_settings(ray_cluster, config):
    import ray

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from local_graph import serve_config_args
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from serve_app.config import AppConfig

    options = AppConfig.model_validate(serve_config_args(ROOT / config)).stages.post_processor.deployment_options()
    actor_options = {**options["ray_actor_options"], "num_cpus": 0.1}  # the test cluster's CPUs are few
    expected = actor_options["runtime_env"]["env_vars"]
    assert {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} <= set(expected)

    actor = ray.remote(AllocatorReport).options(**actor_options).remote()
    try:
        got = ray.get(actor.report.remote(8), timeout=120)
    finally:
        ray.kill(actor)
    assert got["env"] == expected
    assert got["arenas"] <= int(expected["MALLOC_ARENA_MAX"])
