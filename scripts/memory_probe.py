"""Memory of one stage's work in this process, without Ray: where a replica's RSS goes.

    .venv/bin/python scripts/memory_probe.py post --calls 600 --threads 16
    .venv/bin/python scripts/memory_probe.py vae --calls 200
    MALLOC_ARENA_MAX=2 .venv/bin/python scripts/memory_probe.py post ...   # the allocator's settings, as a replica gets them

``post`` calls ``PostProcessor.process`` from a pool of ``--threads``
threads, as Ray Serve runs a sync method (anyio's pool, as many threads as
``max_ongoing_requests``), on the image sizes, formats and transparent share
of scripts/soak.py's mix. ``vae`` builds the embedded tiny model and calls
``LatentDecoder.decode_many`` on one thread, as the VaeDecoder replica does on
its event loop, with batches of the soak's sizes. Input arrays are made once
per size beforehand: in a replica they arrive in Ray's shared object store,
not from malloc.

Every ``--every`` calls it prints RSS and USS (/proc/self/smaps_rollup) and
glibc's own figures (serve_app.allocator.stats: arenas, heap taken from the
kernel, of it in use and free, mmapped chunks). ``--trace`` also diffs
tracemalloc snapshots (Python-level allocations, numpy's included) between
the first report and the last, to tell memory still referenced from memory
the allocator holds free. ``--trim-every-mb`` calls malloc_trim(0) between
calls, as a replica could. The last line is a JSON summary (cpu_s: the process's CPU seconds
over the calls, the cost of a setting on a shared machine where wall time is
noise).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app import allocator  # noqa: E402

SIZES = [((256, 256), 3), ((512, 512), 3), ((1024, 1024), 1), ((512, 768), 1), ((768, 512), 1)]  # (h, w), weight


def proc_memory_mb() -> tuple[float, float]:
    """(RSS, USS) of this process in MiB: USS is its private pages."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Rss"] / 1024, (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def report(label: str, calls: int, started: float) -> dict:
    rss, uss = proc_memory_mb()
    row = {"calls": calls, "s": round(time.perf_counter() - started, 1), "rss_mb": round(rss), "uss_mb": round(uss),
           **allocator.stats()}
    print(f"{label:>6} {json.dumps(row)}", flush=True)
    return row


def post_work(rng: random.Random, pixels: dict):
    """One post-processor call drawn like the soak: sizes, formats, transparent share, b64 or url."""
    from serve_app.generation import PostProcessSpec

    if rng.random() < 0.12:  # gen_transparent: 256 or 512, png or webp, matted
        hw = rng.choice([(256, 256), (512, 512)])
        spec = PostProcessSpec(rng.choice(["png", "webp"]), 100, "b64_json", transparent=True)
    else:
        hw = rng.choices([s for s, _ in SIZES], [w for _, w in SIZES])[0]
        fmt = rng.choice(["png", "jpeg", "webp"])
        spec = PostProcessSpec(fmt, rng.choice([100, rng.randint(20, 100)]), rng.choice(["b64_json", "url"]))
    return pixels[hw], spec


def run_post(a, rng: random.Random):
    from serve_app.config import AppConfig
    from serve_app.deployments.post_processor import PostProcessor

    tmp = tempfile.mkdtemp(prefix="memprobe-")
    pp = PostProcessor(AppConfig(data_dir=tmp, sweep_interval_s=0))
    gen = np.random.default_rng(0)
    pixels = {hw: gen.integers(0, 256, (*hw, 3), np.uint8) for hw, _ in SIZES}
    for hw in [(256, 256), (512, 512)]:  # a subject on a plain backdrop, as the transparent template asks
        img = np.full((*hw, 3), 235, np.uint8)
        img[hw[0] // 4 : 3 * hw[0] // 4, hw[1] // 4 : 3 * hw[1] // 4] = gen.integers(0, 120, (hw[0] // 2, hw[1] // 2, 3))
        pixels[("t", hw)] = img
    jobs = []
    for _ in range(a.calls):
        px, spec = post_work(rng, pixels)
        if spec.transparent:
            px = pixels[("t", px.shape[:2])]
        jobs.append((px, spec))
    return jobs, a.threads, (lambda job: pp.process(*job)), (lambda job: job[0].nbytes)


def run_vae(a, rng: random.Random):
    import torch

    from serve_app.pipeline.components import PipelineLayout
    from serve_app.pipeline.decoders import LatentDecoder
    from serve_app.pipeline.tiny import save_tiny_pipeline

    torch.set_num_threads(a.torch_threads)
    root = Path(a.model) if a.model else Path(tempfile.mkdtemp(prefix="memprobe-model-")) / "tiny-sd"
    if not (root / "model_index.json").exists():
        save_tiny_pipeline(root, "tiny-sd")
    decoder = LatentDecoder(PipelineLayout.read(root))
    factor = 2 ** (len(decoder.vae.config.block_out_channels) - 1)
    channels = decoder.vae.config.latent_channels
    gen = np.random.default_rng(0)
    jobs = []
    for _ in range(a.calls):
        h, w = rng.choices([s for s, _ in SIZES], [wt for _, wt in SIZES])[0]
        n = rng.randint(1, 3)
        jobs.append(gen.standard_normal((n, channels, h // factor, w // factor), dtype=np.float32))
    return jobs, 1, (lambda latents: decoder.decode_many([latents])), (lambda latents: latents.nbytes * 12)  # the uint8 pixels it decodes to


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["post", "vae"])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--threads", type=int, default=16, help="post: worker threads (Ray: max_ongoing_requests)")
    ap.add_argument("--torch-threads", type=int, default=1, help="vae: torch threads (the CPU profile's 1)")
    ap.add_argument("--every", type=int, default=50, help="report every this many calls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", action="store_true", help="diff tracemalloc snapshots (slower)")
    ap.add_argument("--trim-every-mb", type=float, default=0, help="call malloc_trim(0) after this many MB of input (0: never)")
    ap.add_argument("--model", default=None, help="vae: a tiny-sd folder to reuse (built if missing)")
    a = ap.parse_args()
    if a.calls > 5000:
        sys.exit("--calls: at most 5000; this is a probe, not a soak")

    rng = random.Random(a.seed)
    started = time.perf_counter()
    jobs, threads, work, nbytes = (run_post if a.stage == "post" else run_vae)(a, rng)
    trim_every = max(1, int(a.trim_every_mb * 2**20))
    handled = [0]

    def call(job):
        out = work(job)
        if a.trim_every_mb:  # malloc_trim(0) after every trim_every_mb of input, as a replica could
            handled[0] += nbytes(job)
            if handled[0] >= trim_every:
                handled[0] = 0
                allocator.trim()
        return out

    cpu0 = time.process_time()
    rows = [report("setup", 0, started)]
    if a.trace:
        tracemalloc.start(10)
    first_snapshot = None
    done = 0
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(jobs), a.every):
            list(pool.map(call, jobs[i : i + a.every]))
            done += len(jobs[i : i + a.every])
            rows.append(report("calls", done, started))
            if a.trace and first_snapshot is None:
                first_snapshot = tracemalloc.take_snapshot()
    if a.trace:
        last = tracemalloc.take_snapshot()
        traced, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc: traced now {traced / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB; growth since the first report:")
        for stat in last.compare_to(first_snapshot, "lineno")[:8]:
            print(f"  {stat}")
    half = rows[len(rows) // 2]
    # What of the RSS is free memory the allocator holds: malloc_trim(0) gives it back.
    allocator.trim()
    trimmed = report("trim", done, started)
    print(json.dumps({
        "stage": a.stage, "calls": done, "threads": threads, "trim_every_mb": a.trim_every_mb,
        "rss_mb": [rows[1]["rss_mb"], half["rss_mb"], rows[-1]["rss_mb"]],
        "uss_mb": [rows[1]["uss_mb"], half["uss_mb"], rows[-1]["uss_mb"]],
        "rss_peak_mb": max(r["rss_mb"] for r in rows), "cpu_s": round(time.process_time() - cpu0, 1),
        "end": rows[-1], "rss_after_trim_mb": trimmed["rss_mb"],
    }), flush=True)


if __name__ == "__main__":
    main()
