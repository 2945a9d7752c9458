"""Benchmark: the deployed graph against the same model in one diffusers process.

    .venv/bin/python scripts/bench.py --quick      # <= 3 minutes on a 2-core CPU
    .venv/bin/python scripts/bench.py              # more requests, steadier figures
    scripts/gpu_bench OUT_DIR [--bundle FILE]      # the GPU proof (bench.py --gpu): SDXL and FLUX.1-schnell at 1024x1024

In one run, on one machine and model directory:
1. baseline: ``StableDiffusionPipeline.from_pretrained`` (or the SDXL pipeline)
   in this process, same size, steps, guidance and seeds: one image at a time,
   then in batches;
2. the Ray Serve graph (built by the project's builder with the chosen
   serve config's args) over HTTP through the official ``openai`` client, at
   concurrency 1 and 8, with the CPU time each process used per image at
   concurrency 8 (where the cores go: model stages, ingress, proxy, Ray);
3. the fair peer (CPU runs): scripts/peer_server.py, the same diffusers
   pipeline behind one FastAPI process with the same PNG and base64
   encoding, driven by the same client code at the same concurrencies;
4. post-processing: PNG and JPEG encode + base64 of a 1024x1024 model image.
Prints a table, writes results/bench-<time>.json and a bar chart PNG beside it;
the last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from local_graph import ROOT, pctl, serve_config_args, start_local_graph, stop_local_graph

PROMPT = "a red circle on a blue background"  # a scene the embedded model was trained on


def summarize(latencies: list[float], images: int, wall: float) -> dict:
    return {
        "p50_s": round(statistics.median(latencies), 4),
        "p95_s": round(pctl(latencies, 0.95), 4),
        "images": images,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3),
    }


# --- models ---------------------------------------------------------------------------

# The GPU proof's models: configs/full-size folder, the tiny stand-in of the
# same architecture (--tiny), size, steps, guidance.
GPU_MODELS = {
    "sdxl": ("sdxl", "tiny-sdxl", 1024, 30, 5.0),
    "flux1-schnell": ("flux1-schnell", "tiny-flux-schnell", 1024, 4, 0.0),
}


def gpu_model(name: str, tiny: bool, device: str) -> tuple[Path, int, int, float]:
    """(model directory, size, steps, guidance): real-size random weights
    from the published configs (built on the device, saved in bfloat16), or
    with --tiny a tiny model of the same architecture at a small size."""
    folder, kind, size, steps, guidance = GPU_MODELS[name]
    models = ROOT / "data" / "models"
    if tiny:
        from serve_app.pipeline.tiny import save_tiny_pipeline

        return save_tiny_pipeline(models / kind, kind), 128, min(steps, 4), guidance
    import torch

    from serve_app.pipeline.full_size import save_random_pipeline

    # Built directly in bfloat16: half the memory and time of float32 init.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return save_random_pipeline(ROOT / "configs" / "full-size" / folder, models / f"random-{folder}", device=device, dtype=torch.bfloat16), size, steps, guidance
    finally:
        torch.set_default_dtype(previous)


# --- baseline -------------------------------------------------------------------------

def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def run_baseline(
    model_dir: Path, size: int, steps: int, guidance: float, n_seq: int, n_batched: int, batch: int, device: str, measure_denoiser: bool = False
) -> dict:
    """The same model in this process, as diffusers runs it: one image at a
    time, then in batches. On a GPU with the GPU profile's optimisations
    (bfloat16, SDPA attention, channels_last). With ``measure_denoiser``
    (the GPU proof), also the denoising network alone (denoiser_throughput)."""
    import torch
    from diffusers import DiffusionPipeline

    cuda = device.startswith("cuda")
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.bfloat16 if cuda else torch.float32)
    pipe.to(device)
    if cuda:
        denoiser_of(pipe).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)

    def call(seeds: list[int]):
        out = pipe(
            [PROMPT] * len(seeds),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images
        if cuda:
            torch.cuda.synchronize()
        return out

    call([0])  # warm-up: first-call allocations and kernel selection
    # The batched warm-up also keeps the denoising network's first inputs,
    # to measure the network alone at the batch the graph's denoiser runs.
    captured: dict = {}
    if measure_denoiser:
        hook = denoiser_of(pipe).register_forward_pre_hook(lambda m, args, kwargs: captured.setdefault("call", (args, kwargs)), with_kwargs=True)
    call(list(range(batch)))
    if measure_denoiser:
        hook.remove()
    lat = []
    t0 = time.perf_counter()
    for i in range(n_seq):
        t = time.perf_counter()
        call([1000 + i])
        lat.append(time.perf_counter() - t)
    sequential = summarize(lat, n_seq, time.perf_counter() - t0)

    lat = []
    t0 = time.perf_counter()
    for b in range(0, n_batched, batch):
        t = time.perf_counter()
        call([2000 + b + j for j in range(min(batch, n_batched - b))])
        lat.append(time.perf_counter() - t)
    batched = summarize(lat, n_batched, time.perf_counter() - t0)
    batched["batch_size"] = batch
    result = {"sequential": sequential, "batched": batched}
    if measure_denoiser:
        result["denoiser"] = denoiser_throughput(denoiser_of(pipe), *captured["call"], cuda)
    del pipe, captured
    if cuda:
        torch.cuda.empty_cache()
    return result


def denoiser_throughput(network, args: tuple, kwargs: dict, cuda: bool, reps: int = 5) -> dict:
    """The denoising network alone on one step's inputs: FLOPs counted by
    PyTorch's FlopCounterMode (matrix products and attention), the time of
    a call, and the TFLOP/s that makes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            network(*args, **kwargs)
        flops = counter.get_total_flops()
        network(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            network(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t) / reps
    sample = args[0] if args else next(iter(kwargs.values()))
    return {"batch": int(sample.shape[0]), "flop_per_call": int(flops), "s_per_call": round(seconds, 5),
            "tflops": round(flops / seconds / 1e12, 2)}


# Dense bfloat16 peaks from NVIDIA's data sheets (TFLOP/s), by device name.
BF16_DENSE_PEAK = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))


def card_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_DENSE_PEAK if key in device_name), None)


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """What a large bfloat16 matrix product achieves on this card: the practical ceiling."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 1)


def gpu_memory_by_process() -> dict[str, int]:
    """MiB of GPU memory per process label (replicas by deployment), from nvidia-smi; empty where it lists no processes."""
    import subprocess

    import psutil

    try:
        rows = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[str, int] = {}
    for row in rows:
        pid, mib = (int(v) for v in row.split(","))
        try:
            label = process_label(psutil.Process(pid))
        except psutil.Error:
            label = f"pid {pid}"
        out[label] = out.get(label, 0) + mib
    return out


# --- graph ----------------------------------------------------------------------------

def start_graph(
    serve_config: Path, model_dir: Path, size: int, steps: int, guidance: float, data_dir: Path, dtype: str = "float32",
    settle: bool = True,
) -> tuple[str, str]:
    """Start the graph on the model; with ``settle``, wait until the
    post-processor's matting JIT, which compiles in the background on a
    fresh install, is done (one transparent image), so that it takes no CPU
    from the measurements."""
    args = serve_config_args(serve_config)
    registry = {
        "pipelines": {
            "bench": {
                "source": str(model_dir),
                "default_steps": steps,
                "default_guidance": guidance,
                "default_size": f"{size}x{size}",
                "sizes": [f"{size}x{size}"],
                "dtype": dtype,
            }
        },
        "models": [{"id": "bench", "pipeline": "bench", "family": "gpt-image", "tiers": {"medium": {"steps": steps}}}],
        "default_model": "bench",
        "moderation": None,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    reg_path = data_dir / "bench-models.yaml"
    reg_path.write_text(yaml.safe_dump(registry))
    # One pipeline, "bench": a config's stage groups name pipelines of its own registry.
    args.update(models=str(reg_path), data_dir=str(data_dir), stage_groups={})
    base_url = start_local_graph(args) + "/v1"
    if settle:
        from openai import OpenAI

        OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600).images.generate(
            model="bench", prompt=PROMPT, size=f"{size}x{size}", background="transparent", output_format="png"
        )
    return base_url, "bench"


def run_http(base_url: str, model: str, size: int, runs: dict[int, int], cpu_at: int | None = None) -> dict:
    """Requests through the official client, ``runs`` = {concurrency: requests}
    (the same client code for the graph and the peer). With ``cpu_at``, the
    run at that concurrency also records the CPU every process used per image."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)

    def one(seed: int) -> float:
        t = time.perf_counter()
        r = client.images.generate(model=model, prompt=PROMPT, size=f"{size}x{size}", quality="medium", extra_body={"seed": seed})
        assert r.data and r.data[0].b64_json
        return time.perf_counter() - t

    burst = min(max(runs), 8)
    for i in range(3):  # warm-up, including a concurrent burst so batch shapes are warm too
        one(i)
    with ThreadPoolExecutor(burst) as ex:
        list(ex.map(one, range(burst)))
    out = {}
    for concurrency, n in runs.items():
        before = cpu_seconds_by_process() if concurrency == cpu_at else None
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            lat = list(ex.map(one, range(1000 * concurrency, 1000 * concurrency + n)))
        out[f"c{concurrency}"] = summarize(lat, n, time.perf_counter() - t0)
        if before is not None:
            out[f"c{concurrency}"]["cpu_ms_per_image"] = cpu_ms_per_image(before, cpu_seconds_by_process(), n)
    return out


# --- the fair peer: one diffusers process behind FastAPI ---------------------------------

def start_peer(model_dir: Path, steps: int, guidance: float, device: str, dtype: str) -> tuple[object, str]:
    """scripts/peer_server.py in its own process; returns (process, base URL) once it answers."""
    import socket
    import subprocess

    from local_graph import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "peer_server.py"), str(model_dir), "--port", str(port),
         "--steps", str(steps), "--guidance", str(guidance), "--device", device, "--dtype", dtype],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the peer server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the peer server did not start within 300 s")


def run_peer(model_dir: Path, size: int, steps: int, guidance: float, runs: dict[int, int], device: str, dtype: str) -> dict:
    proc, base_url = start_peer(model_dir, steps, guidance, device, dtype)
    try:
        return run_http(base_url, "peer", size, runs, cpu_at=8)
    finally:
        proc.terminate()
        proc.wait(30)


def serving_cpu_ms(cpu: dict[str, float]) -> float:
    """CPU per image of every process but the model stages and the load
    generator: the HTTP proxy, the ingress, the post-processor, Ray's own
    processes and anything else the run woke up."""
    from serve_app.app import MODEL_STAGES

    stages = tuple(cls.__name__ for cls in MODEL_STAGES.values())  # replica labels: "<app>:<Class>-<pipeline>"
    return round(
        sum(v for k, v in cpu.items() if k != "total" and not k.split(":")[-1].startswith(stages) and not k.startswith("bench client")), 1
    )


def process_label(p) -> str:
    """A process's label: Ray actors by their ``ray::`` title (replicas by
    deployment), this process as the client (it is also Ray's driver)."""
    cmd = p.cmdline() or [p.name() or "?"]
    if p.pid == os.getpid():
        return "bench client (openai) + Ray driver"
    if cmd[0].startswith("ray::"):
        # "ray::ServeReplica:<app>:<deployment>", or "ray::<Actor>[.<method running>]"
        title = cmd[0].split()[0].removeprefix("ray::")
        return title.removeprefix("ServeReplica:") if title.startswith("ServeReplica:") else title.split(".")[0]
    return Path(cmd[0]).name if "ray" in " ".join(cmd[:2]) else "other child processes"


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by this process and its
    descendants (the local Ray cluster it started, the peer server), labelled.
    Other processes on the machine are not counted."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            times = p.cpu_times()
            out[p.pid] = (process_label(p), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def cpu_ms_per_image(before: dict, after: dict, images: int) -> dict[str, float]:
    """Where the machine's CPU time went during a run, per image, by process
    label (replicas of one deployment summed), largest first, with the total."""
    per_label: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        used = cpu - before.get(pid, (label, 0.0))[1]
        per_label[label] = per_label.get(label, 0.0) + used
    rows = {k: round(v / images * 1000, 1) for k, v in sorted(per_label.items(), key=lambda kv: -kv[1]) if v > 0}
    rows["total"] = round(sum(per_label.values()) / images * 1000, 1)
    return rows


# --- post-processing ------------------------------------------------------------------

def run_codecs(model_dir: Path) -> dict:
    """Encode + base64 of a 1024x1024 image the model made, as the post-processor does."""
    import torch

    from serve_app.codecs import encode_image
    from serve_app.pipeline.architectures import architecture_for
    from serve_app.pipeline.architectures.sd import StableDiffusion
    from serve_app.pipeline.components import PipelineLayout
    from serve_app.pipeline.decoders import LatentDecoder

    layout = PipelineLayout.read(model_dir)
    latents = torch.randn((1, 4, 128, 128), generator=torch.Generator().manual_seed(0)).numpy()
    # The embedded model's own picture; noise of the same size for other architectures (whose latents differ).
    own = architecture_for(layout) is StableDiffusion
    pixels = LatentDecoder(layout).decode(latents)[0] if own else np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8)
    out = {}
    for fmt in ("png", "jpeg", "webp"):
        times = []
        for _ in range(7):
            t = time.perf_counter()
            data = encode_image(pixels, fmt, 100 if fmt != "webp" else 90, 1)
            base64.b64encode(data)
            times.append(time.perf_counter() - t)
        out[f"{fmt}_encode_b64_ms_1024"] = round(statistics.median(times) * 1000, 2)
        out[f"{fmt}_bytes_1024"] = len(data)
    return out


# --- report ---------------------------------------------------------------------------

def throughput_bars(run: dict, prefix: str = "") -> list[tuple[str, float]]:
    """One model's images/s bars: in-process, the peer (if run), the graph at each concurrency."""
    return [
        (f"{prefix}in-process sequential", run["baseline"]["sequential"]["images_per_s"]),
        (f"{prefix}in-process batched", run["baseline"]["batched"]["images_per_s"]),
        *((f"{prefix}peer server c={c[1:]}", r["images_per_s"]) for c, r in run.get("peer", {}).items()),
        *((f"{prefix}graph c={c[1:]}", r["images_per_s"]) for c, r in run["graph"].items()),
    ]


def draw_chart(title: str, bars: list[tuple[str, float]], path: Path) -> None:
    """A bar chart of images/s, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    w, left, top, bar_h = 760, 250, 40, 34
    h = top + bar_h * len(bars) + 20
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    top_value = max(v for _, v in bars) or 1
    for i, (label, v) in enumerate(bars):
        y = top + i * bar_h
        d.text((10, y + bar_h // 3), label, fill="black")
        d.rectangle([left, y + 6, left + int((w - left - 80) * v / top_value), y + bar_h - 6], fill=(60, 110, 200))
        d.text((left + int((w - left - 80) * v / top_value) + 6, y + bar_h // 3), f"{v:.2f}", fill="black")
    img.save(path)


def ratios(run: dict) -> dict:
    """The graph against the in-process baselines (and the peer, where run), within one run."""
    graph, base = run["graph"], run["baseline"]
    out = {
        "c1_latency_ratio": round(graph["c1"]["p50_s"] / base["sequential"]["p50_s"], 3),
        "c8_vs_batched": round(graph["c8"]["images_per_s"] / base["batched"]["images_per_s"], 3),
        "c8_vs_sequential": round(graph["c8"]["images_per_s"] / base["sequential"]["images_per_s"], 3),
    }
    if run.get("peer"):
        out["c1_vs_peer"] = round(graph["c1"]["p50_s"] / run["peer"]["c1"]["p50_s"], 3)
        out["c8_vs_peer"] = round(graph["c8"]["images_per_s"] / run["peer"]["c8"]["images_per_s"], 3)
    return out


def write_results(out: Path, summary: dict, title: str, bars: list[tuple[str, float]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"bench-{stamp}.json"
    path.write_text(json.dumps(summary, indent=2))
    draw_chart(title, bars, out / f"bench-{stamp}.png")
    print(f"wrote {path} and .png", flush=True)
    return path


def say(started: float, msg: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)


def cpu_run(a: argparse.Namespace, started: float) -> dict:
    """The shipped embedded model on this CPU, at its registry defaults: in-process, the fair peer and the graph."""
    from serve_app.config import load_registry

    pipeline = next(iter(load_registry(str(ROOT / "configs" / "models.yaml")).pipelines.values()))
    model_dir = ROOT / pipeline.source
    size, steps, guidance = 512, pipeline.default_steps, pipeline.default_guidance
    serve_config = Path(a.serve_config or ROOT / "serve_config.yaml")
    n_seq, n_batched, batch, n_c1, n_c8 = (10, 24, 8, 10, 32) if a.quick else (30, 64, 8, 30, 96)
    say(started, f"model {model_dir}  size {size}  steps {steps}  guidance {guidance}  serve config {serve_config}")
    baseline = run_baseline(model_dir, size, steps, guidance, n_seq, n_batched, batch, "cpu")
    say(started, f"baseline  sequential {baseline['sequential']}\nbaseline  batched    {baseline['batched']}")
    codecs = run_codecs(model_dir)
    say(started, f"codecs    {codecs}")
    runs = {1: n_c1, 8: n_c8}
    peer = run_peer(model_dir, size, steps, guidance, runs, "cpu", "float32")
    say(started, f"peer      c1 {peer['c1']}\npeer      c8 { {k: v for k, v in peer['c8'].items() if k != 'cpu_ms_per_image'} }")
    base_url, model = start_graph(serve_config, model_dir, size, steps, guidance, ROOT / "data" / "bench")
    graph = run_http(base_url, model, size, runs, cpu_at=8)
    stop_local_graph()
    cpu = graph["c8"]["cpu_ms_per_image"]
    say(started, f"graph     c1 {graph['c1']}\ngraph     c8 { {k: v for k, v in graph['c8'].items() if k != 'cpu_ms_per_image'} }")
    say(started, "graph     c8 CPU ms per image: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    run = {
        "config": {"size": size, "steps": steps, "guidance": guidance, "device": "cpu", "cpus": os.cpu_count(), "quick": a.quick,
                   "serve_config": str(serve_config.relative_to(ROOT) if serve_config.is_relative_to(ROOT) else serve_config)},
        "baseline": baseline, "peer": peer, "graph": graph, "codecs": codecs,
    }
    run.update(ratios(run), serving_cpu_ms_per_image=serving_cpu_ms(cpu))
    print(f"c1 latency ratio {run['c1_latency_ratio']} (target <= 1.10)   c8 vs batched {run['c8_vs_batched']} (>= 0.9)   "
          f"c8 vs sequential {run['c8_vs_sequential']} (>= 1.3)")
    print(f"against the peer server: c1 {run['c1_vs_peer']} (target <= 1.25)   c8 {run['c8_vs_peer']} (>= 1.0)   "
          f"serving CPU {run['serving_cpu_ms_per_image']} ms per image (<= 60)")
    run["bench_wall_s"] = round(time.perf_counter() - started, 1)
    write_results(Path(a.out), run, f"images/s, {size}x{size}, {steps} steps, cpu", throughput_bars(run))
    return run


def gpu_run(a: argparse.Namespace, started: float) -> dict:
    """The GPU proof: per model, in-process diffusers (sequential, batched at
    8), the denoising network alone, and the graph with the GPU profile at
    concurrency 1, 8 and 32. With --tiny --device cpu the same steps run on
    tiny models, so that this path is tested where there is no GPU."""
    import torch

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("bench --gpu: no CUDA device found (torch.cuda.is_available() is False); use --device cpu --tiny to check the run on a CPU")
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    serve_config = Path(a.serve_config or ROOT / "configs" / ("serve_config.gpu.yaml" if cuda else "serve_config.all-tiny.yaml"))
    summary: dict = {"device": device_name, "serve_config": str(serve_config), "tiny": a.tiny, "models": {}}
    if cuda:
        summary["matmul_bf16_tflops"] = matmul_tflops()
        summary["bf16_dense_peak_tflops"] = card_peak(device_name)
        say(started, f"{device_name}: bf16 matmul {summary['matmul_bf16_tflops']} TFLOP/s, data-sheet peak {summary['bf16_dense_peak_tflops']}")
    n_seq, n_batched, batch = (2, 8, 8) if a.quick else (4, 16, 8)
    runs = {1: 2, 8: 8, 32: 32} if a.quick else {1: 4, 8: 16, 32: 64}
    bars: list[tuple[str, float]] = []
    for name in a.models:
        model_dir, size, steps, guidance = gpu_model(name, a.tiny, a.device)
        say(started, f"{name}: model ready at {model_dir} ({size}x{size}, {steps} steps, guidance {guidance})")
        baseline = run_baseline(model_dir, size, steps, guidance, n_seq, n_batched, batch, a.device, measure_denoiser=True)
        say(started, f"{name}: in-process sequential {baseline['sequential']}; batched {baseline['batched']}; denoiser {baseline['denoiser']}")
        # Tiny models measure nothing anyone reads (the suite's run of this command): no settling.
        base_url, model = start_graph(
            serve_config, model_dir, size, steps, guidance, ROOT / "data" / "bench", "bfloat16", settle=not a.tiny
        )
        say(started, f"{name}: graph up")
        graph = run_http(base_url, model, size, runs)
        memory = gpu_memory_by_process() if cuda else {}
        stop_local_graph()
        say(started, f"{name}: graph {graph}; GPU MiB per process {memory}")
        run = {"size": size, "steps": steps, "guidance": guidance, "baseline": baseline, "graph": graph, "gpu_memory_mib": memory}
        run.update(ratios(run))
        peak = summary.get("bf16_dense_peak_tflops")
        if peak:
            run["denoiser_vs_peak"] = round(baseline["denoiser"]["tflops"] / peak, 3)
        summary["models"][name] = run
        bars += throughput_bars(run, f"{name} ")
        print(f"{name}: c1 latency ratio {run['c1_latency_ratio']} (target <= 1.05)   c8 vs batched {run['c8_vs_batched']} (>= 0.95)   "
              f"c8 vs sequential {run['c8_vs_sequential']} (>= 1.5)   denoiser vs peak {run.get('denoiser_vs_peak')} (>= 0.5)", flush=True)
    summary["bench_wall_s"] = round(time.perf_counter() - started, 1)
    write_results(Path(a.out), summary, f"images/s on {device_name}", bars)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests: about 3 minutes on a 2-core CPU")
    ap.add_argument("--gpu", action="store_true", help="the GPU proof: real-size SDXL and FLUX.1-schnell with random weights at 1024x1024")
    ap.add_argument("--device", default="cuda", help="with --gpu: cuda, or cpu (with --tiny) to check the run without a GPU")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: tiny models of the same architectures at 128x128")
    ap.add_argument("--models", nargs="+", default=list(GPU_MODELS), choices=list(GPU_MODELS), help="with --gpu: which models")
    ap.add_argument("--serve-config", default=None, help="serve config whose args (stage options) the graph uses")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder for the JSON and the chart")
    a = ap.parse_args()
    started = time.perf_counter()
    summary = gpu_run(a, started) if a.gpu else cpu_run(a, started)
    print(json.dumps(summary, separators=(",", ":")), flush=True)  # the last line: the summary


if __name__ == "__main__":
    main()
