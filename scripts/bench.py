"""Benchmark: the deployed graph against the same model in one diffusers process.

    .venv/bin/python scripts/bench.py --quick      # <= 3 minutes on a 2-core CPU
    .venv/bin/python scripts/bench.py              # more requests, steadier figures
    .venv/bin/python scripts/bench.py --gpu        # SDXL-shaped random-weight model at 1024x1024, 30 steps (needs CUDA)

In one run, on one machine and model directory:
1. baseline: ``StableDiffusionPipeline.from_pretrained`` (or the SDXL pipeline)
   in this process, same size, steps, guidance and seeds: one image at a time,
   then in batches;
2. the Ray Serve graph (built by the project's builder with the chosen
   serve config's args) over HTTP through the official ``openai`` client, at
   concurrency 1 and 8, with the CPU time each process used per image at
   concurrency 8 (where the cores go: model stages, ingress, proxy, Ray);
3. post-processing: PNG and JPEG encode + base64 of a 1024x1024 model image.
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

PROMPT = "A cute baby sea otter floating on its back"


def summarize(latencies: list[float], images: int, wall: float) -> dict:
    return {
        "p50_s": round(statistics.median(latencies), 4),
        "p95_s": round(pctl(latencies, 0.95), 4),
        "images": images,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3),
    }


# --- models ---------------------------------------------------------------------------

def sdxl_shaped_model(target: Path) -> Path:
    """An SDXL-base-shaped pipeline (published architecture: UNet 320/640/1280
    with 1/2/10 transformer layers, CLIP-L + OpenCLIP-bigG text encoders,
    4-channel VAE) with random weights: timings equal real weights'."""
    if (target / "model_index.json").exists():
        return target
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from serve_app.pipeline.tiny import write_byte_level_tokenizer

    tok_dir = target.parent / (target.name + "-tokenizer")
    write_byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, max_position_embeddings=77, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=vocab - 1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, **common))
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **common)
    )
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler
    )
    pipe.to(torch.float16).save_pretrained(str(target))
    return target


# --- baseline -------------------------------------------------------------------------

def run_baseline(model_dir: Path, size: int, steps: int, guidance: float, n_seq: int, n_batched: int, batch: int, gpu: bool) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if gpu else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype)
    if gpu:
        pipe.to("cuda")
        pipe.unet.to(memory_format=torch.channels_last)
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
        if gpu:
            torch.cuda.synchronize()
        return out

    call([0])  # warm-up: first-call allocations and kernel selection
    call(list(range(batch)))
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
    del pipe
    if gpu:
        torch.cuda.empty_cache()
    return {"sequential": sequential, "batched": batched}


# --- graph ----------------------------------------------------------------------------

def start_graph(serve_config: Path, model_dir: Path, size: int, steps: int, guidance: float, data_dir: Path) -> tuple[str, str]:
    args = serve_config_args(serve_config)
    registry = {
        "pipelines": {
            "bench": {
                "source": str(model_dir),
                "default_steps": steps,
                "default_guidance": guidance,
                "default_size": f"{size}x{size}",
                "sizes": [f"{size}x{size}"],
                "dtype": "float16",
            }
        },
        "models": [{"id": "bench", "pipeline": "bench", "family": "gpt-image", "tiers": {"medium": {"steps": steps}}}],
        "default_model": "bench",
        "moderation": None,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    reg_path = data_dir / "bench-models.yaml"
    reg_path.write_text(yaml.safe_dump(registry))
    args.update(models=str(reg_path), data_dir=str(data_dir))
    return start_local_graph(args) + "/v1", "bench"


def run_graph(base_url: str, model: str, size: int, n_c1: int, n_c8: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)

    def one(seed: int) -> float:
        t = time.perf_counter()
        r = client.images.generate(model=model, prompt=PROMPT, size=f"{size}x{size}", quality="medium", extra_body={"seed": seed})
        assert r.data and r.data[0].b64_json
        return time.perf_counter() - t

    for i in range(3):  # warm-up, including a concurrent burst so batch shapes are warm too
        one(i)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, range(8)))
    lat = []
    t0 = time.perf_counter()
    for i in range(n_c1):
        lat.append(one(1000 + i))
    c1 = summarize(lat, n_c1, time.perf_counter() - t0)
    before = cpu_seconds_by_process()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        lat = list(ex.map(one, range(2000, 2000 + n_c8)))
    c8 = summarize(lat, n_c8, time.perf_counter() - t0)
    c8["cpu_ms_per_image"] = cpu_ms_per_image(before, cpu_seconds_by_process(), n_c8)
    return {"c1": c1, "c8": c8}


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by every process on the
    machine, labelled: Ray actors by their ``ray::`` title, this process as
    the client (it is also Ray's driver)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            times = p.cpu_times()
            cmd = p.info["cmdline"] or [p.info["name"] or "?"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid == os.getpid():
            label = "bench client (openai) + Ray driver"
        elif cmd[0].startswith("ray::"):
            # "ray::ServeReplica:<app>:<deployment>", or "ray::<Actor>[.<method running>]"
            title = cmd[0].split()[0].removeprefix("ray::")
            label = title.removeprefix("ServeReplica:") if title.startswith("ServeReplica:") else title.split(".")[0]
        else:
            label = Path(cmd[0]).name if "ray" in " ".join(cmd[:2]) else "other processes"
        out[p.pid] = (label, times.user + times.system)
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

def draw_chart(summary: dict, path: Path) -> None:
    """A bar chart of images/s, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    bars = [
        ("in-process sequential", summary["baseline"]["sequential"]["images_per_s"]),
        ("in-process batched", summary["baseline"]["batched"]["images_per_s"]),
        ("graph c=1", summary["graph"]["c1"]["images_per_s"]),
        ("graph c=8", summary["graph"]["c8"]["images_per_s"]),
    ]
    w, h, left, top = 720, 360, 190, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"images/s, {summary['config']['size']}x{summary['config']['size']}, {summary['config']['steps']} steps, {summary['config']['device']}", fill="black")
    top_value = max(v for _, v in bars) or 1
    bar_h = (h - top - 20) // len(bars)
    for i, (label, v) in enumerate(bars):
        y = top + i * bar_h
        d.text((10, y + bar_h // 3), label, fill="black")
        d.rectangle([left, y + 8, left + int((w - left - 80) * v / top_value), y + bar_h - 8], fill=(60, 110, 200))
        d.text((left + int((w - left - 80) * v / top_value) + 6, y + bar_h // 3), f"{v:.2f}", fill="black")
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests: about 3 minutes on a 2-core CPU")
    ap.add_argument("--gpu", action="store_true", help="SDXL-shaped model at 1024x1024, 30 steps, on CUDA")
    ap.add_argument("--serve-config", default=None, help="serve config whose args (stage options) the graph uses")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder for the JSON and the chart")
    a = ap.parse_args()

    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        size, steps, guidance = 1024, 30, 5.0
        model_dir = sdxl_shaped_model(ROOT / "data" / "models" / "sdxl-shaped")
        serve_config = Path(a.serve_config or ROOT / "configs" / "serve_config.gpu.yaml")
        n_seq, n_batched, batch, n_c1, n_c8 = (4, 8, 4, 4, 16) if a.quick else (8, 16, 4, 8, 32)
    else:
        from serve_app.pipeline.tiny import save_tiny_pipeline

        size, steps, guidance = 512, 4, 7.5
        model_dir = save_tiny_pipeline(ROOT / "data" / "models" / "tiny-sd", "tiny-sd")
        serve_config = Path(a.serve_config or ROOT / "serve_config.yaml")
        n_seq, n_batched, batch, n_c1, n_c8 = (10, 24, 8, 10, 32) if a.quick else (30, 64, 8, 30, 96)

    started = time.perf_counter()
    print(f"model {model_dir}  size {size}  steps {steps}  guidance {guidance}  serve config {serve_config}", flush=True)
    baseline = run_baseline(model_dir, size, steps, guidance, n_seq, n_batched, batch, a.gpu)
    print(f"baseline  sequential {baseline['sequential']}\nbaseline  batched    {baseline['batched']}", flush=True)
    codecs = run_codecs(model_dir) if not a.gpu else {}
    if codecs:
        print(f"codecs    {codecs}", flush=True)
    base_url, model = start_graph(serve_config, model_dir, size, steps, guidance, ROOT / "data" / "bench")
    graph = run_graph(base_url, model, size, n_c1, n_c8)
    cpu = graph["c8"]["cpu_ms_per_image"]
    print(f"graph     c1 {graph['c1']}\ngraph     c8 { {k: v for k, v in graph['c8'].items() if k != 'cpu_ms_per_image'} }", flush=True)
    print("graph     c8 CPU ms per image: " + ", ".join(f"{k} {v}" for k, v in cpu.items()), flush=True)

    summary = {
        "config": {
            "size": size,
            "steps": steps,
            "guidance": guidance,
            "device": "cuda" if a.gpu else "cpu",
            "cpus": os.cpu_count(),
            "quick": a.quick,
            "serve_config": str(serve_config.relative_to(ROOT) if serve_config.is_relative_to(ROOT) else serve_config),
        },
        "baseline": baseline,
        "graph": graph,
        "codecs": codecs,
        "c1_latency_ratio": round(graph["c1"]["p50_s"] / baseline["sequential"]["p50_s"], 3),
        "c8_vs_batched": round(graph["c8"]["images_per_s"] / baseline["batched"]["images_per_s"], 3),
        "c8_vs_sequential": round(graph["c8"]["images_per_s"] / baseline["sequential"]["images_per_s"], 3),
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(summary, indent=2))
    draw_chart(summary, out / f"bench-{stamp}.png")
    print(f"c1 latency ratio {summary['c1_latency_ratio']} (target <= 1.10)   "
          f"c8 vs batched {summary['c8_vs_batched']} (>= 0.9)   c8 vs sequential {summary['c8_vs_sequential']} (>= 1.3)")
    print(f"wrote {out / f'bench-{stamp}.json'} and .png", flush=True)
    stop_local_graph()  # before the summary, so that the summary is the last line
    print(json.dumps(summary, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
