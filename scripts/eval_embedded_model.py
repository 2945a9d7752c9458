"""Score the embedded model: does it draw what it is asked?

    python scripts/eval_embedded_model.py                         # the shipped registry's default model
    python scripts/eval_embedded_model.py --count 24 --sheet results/embedded-sheet.png

Captions of single-shape scenes, some drawn like the training data and some
with (colour, shape, position) combinations that training never saw
(``serve_app.pipeline.scenes.held_out``), go through the service's own graph
in this process (ingress, text encoder, denoiser, VAE, post-processor; the
official openai client) at 256x256 and 512x512 with fixed seeds. Each image
is measured by simple geometry:

- background: the named colour nearest the median of the image's border;
- shape colour: the named colour nearest the median of the middle of where the shape should be;
- shape: the pixels nearest the shape's colour fill some fraction of their
  bounding box; the nearest of circle (pi/4), square (1) and triangle (1/2);
- position: the named position nearest those pixels' centroid.

Inpainting: a scene, its masked quadrant (or half) repainted with a different
shape and colour asked for there; right when that shape and colour come out
in the mask, and the protected region must stay within a few levels.

Prints the scores (and each stage's latency) and writes a contact sheet.
Targets (issue 14): background >= 95%, shape colour >= 90%, shape >= 80%,
position >= 80%, on the held-out captions as on the seen ones; inpainting >= 80%.
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app.pipeline.scenes import (  # noqa: E402
    COLOURS,
    SHAPES,
    Scene,
    Score,
    Shape,
    caption,
    random_scene,
    render,
    score,
)

def client_for(models: str, data_dir: str):
    """The openai client on the in-process graph built from a registry."""
    import openai
    from fastapi.testclient import TestClient

    from tests.conftest import TEST_API_KEY, in_process_app

    http = TestClient(in_process_app(models, data_dir))
    http.__enter__()
    return openai.OpenAI(api_key=TEST_API_KEY, base_url="http://testserver/v1", http_client=http, max_retries=0)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def percent(scores: list[Score], field: str) -> str:
    return f"{100 * sum(getattr(s, field) for s in scores) / max(1, len(scores)):5.1f}%"


def contact_sheet(tiles: list[tuple[np.ndarray, str, str]], path: Path, thumb: int = 160, columns: int = 8) -> None:
    """A grid of thumbnails, each with its caption and what was measured."""
    rows = (len(tiles) + columns - 1) // columns
    line = 11
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 4 * line)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text, found) in enumerate(tiles):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + 4 * line)
        sheet.paste(Image.fromarray(image).resize((thumb, thumb)), (x, y))
        words, lines = text.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) > 30 and len(lines) < 3:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        for j, t in enumerate(lines[:3] + [found]):
            draw.text((x + 2, y + thumb + j * line), t, fill="black" if j < 3 else "darkred")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def pipeline_latency(models: str, model: str, sizes: list[int], repeats: int = 5) -> None:
    """The issue's speed figure: diffusers' own StableDiffusionPipeline on
    the model's weights, in this process (main's 2 torch threads), at the
    registry's default steps and guidance; the graph's latency lines (printed later)
    add the stages' hand-offs, PNG encoding and the client."""
    import torch
    import yaml
    from diffusers import StableDiffusionPipeline

    registry = yaml.safe_load(Path(models).read_text())
    name = next(m["pipeline"] for m in registry["models"] if m["id"] == model)
    settings = registry["pipelines"][name]
    # A relative source is the repository's; ROOT / an absolute path is that path.
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / settings["source"]))
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = settings["default_steps"], settings["default_guidance"]
    for size in sizes:
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            with torch.no_grad():
                pipe("a red circle on a white background", height=size, width=size, num_inference_steps=steps,
                     guidance_scale=guidance, generator=torch.Generator().manual_seed(i))
            times.append(time.perf_counter() - start)
        # The first call warms up (allocations, lazy imports) and is left out.
        print(f"one-process diffusers latency {size}x{size} ({steps} steps, guidance {guidance}): "
              f"median {statistics.median(times[1:]):.2f} s, min {min(times[1:]):.2f} s over {repeats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(ROOT / "configs" / "models.yaml"), help="model registry")
    parser.add_argument("--model", default="dall-e-2", help="model id to evaluate")
    parser.add_argument("--count", type=int, default=16, help="captions per set (seen, held out) and size")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--inpaint", type=int, default=12, help="inpainting cases")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, help="guidance (default: the pipeline's)")
    parser.add_argument("--source", help="a pipeline folder to score instead of the registry's (a training checkpoint)")
    parser.add_argument("--no-latency", action="store_true", help="skip the one-process diffusers timing")
    parser.add_argument("--sheet", default=str(ROOT / "results" / "embedded-eval.png"), help="contact sheet to write")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    if args.steps or args.guidance or args.source:
        # The registry's pipeline defaults are what the service uses; overriding them means a registry of our own.
        import yaml

        registry = yaml.safe_load(Path(args.models).read_text())
        for pipeline in registry["pipelines"].values():
            if args.source:
                pipeline["source"] = str(Path(args.source).resolve())
            if args.steps:
                pipeline["default_steps"] = args.steps
            if args.guidance:
                pipeline["default_guidance"] = args.guidance
        for model in registry["models"]:
            # The dall-e-3 styles set their own guidance.
            for style in (model.get("styles") or {}).values():
                if args.guidance:
                    style["guidance"] = args.guidance
        tmp = Path(tempfile.mkdtemp()) / "models.yaml"
        for pipeline in registry["pipelines"].values():
            pipeline["source"] = str((ROOT / pipeline["source"]).resolve()) if not Path(pipeline["source"]).is_absolute() else pipeline["source"]
        tmp.write_text(yaml.safe_dump(registry))
        args.models = str(tmp)
    if not args.no_latency:
        # Timed first, before the graph runs in this process: timed after a
        # few of the graph's requests, the same pipeline took 0.85 s at
        # 256x256 against 0.35 s before them (2026-12-02; the process was
        # idle in between, so not a busy thread; cause not found).
        pipeline_latency(args.models, args.model, [int(s) for s in args.sizes.split(",")])
    client = client_for(args.models, tempfile.mkdtemp(prefix="eval-data-"))
    tiles: list[tuple[np.ndarray, str, str]] = []
    latencies: dict[int, list[float]] = {}

    def generate(prompt: str, size: int, seed: int) -> np.ndarray:
        start = time.perf_counter()
        img = client.images.generate(prompt=prompt, model=args.model, size=f"{size}x{size}", response_format="b64_json", extra_body={"seed": seed})
        latencies.setdefault(size, []).append(time.perf_counter() - start)
        return decode(img.data[0].b64_json)

    generate("a red circle on a white background", 256, 0)  # first call: lazy loading
    latencies.clear()
    print(f"model {args.model} from {args.models}")
    for size in (int(s) for s in args.sizes.split(",")):
        for label, held in (("seen", False), ("held-out", True)):
            rng = random.Random(1000 * size + held)
            scores = []
            for i in range(args.count):
                scene = random_scene(rng, held_out_only=held, two_shapes=0.0)
                text = caption(scene, rng)
                image = generate(text, size, seed=i)
                s = score(image, scene)
                scores.append(s)
                tiles.append((image, f"[{size} {label}] {text}", s.found))
            print(
                f"{size}x{size} {label:8}: background {percent(scores, 'background')}  shape colour {percent(scores, 'colour')}"
                f"  shape {percent(scores, 'shape')}  position {percent(scores, 'position')}  (n={len(scores)})"
            )

    # Inpainting: repaint one quadrant of a scene with something else there.
    rng = random.Random(7)
    right, kept = 0, []
    corners = ["top left", "top right", "bottom left", "bottom right"]
    for i in range(args.inpaint):
        background = rng.choice(list(COLOURS))
        original_at, new_at = rng.sample(corners, 2)
        colours = [c for c in COLOURS if c != background]
        old = Shape(rng.choice(SHAPES), rng.choice(colours), "small", original_at)
        new = Shape(rng.choice(SHAPES), rng.choice([c for c in colours if c != old.colour]), "small", new_at)
        before = render(Scene(background, (old,)), 256)
        alpha = np.full((256, 256), 255, np.uint8)
        x0, y0 = (0 if "left" in new_at else 128), (0 if "top" in new_at else 128)
        alpha[y0 : y0 + 128, x0 : x0 + 128] = 0
        mask = before.copy()
        mask.putalpha(Image.fromarray(alpha))
        target = Scene(background, (new,))
        text = caption(target, rng)
        img = client.images.edit(
            image=("scene.png", png(before), "image/png"), mask=("mask.png", png(mask), "image/png"), prompt=text,
            model=args.model, size="256x256", response_format="b64_json", extra_body={"seed": i},
        )
        after = decode(img.data[0].b64_json)
        keep = alpha == 255
        kept.append(int(np.abs(after[keep].astype(int) - np.asarray(before)[keep]).max()))
        s = score(after, target, region=~keep)
        right += s.colour and s.shape
        tiles.append((after, f"[inpaint] {text}", s.found))
    if args.inpaint:
        print(f"inpainting: right {100 * right / args.inpaint:5.1f}% (shape and colour in the mask, n={args.inpaint}); protected region max change {max(kept)} levels")
    for size, times in sorted(latencies.items()):
        print(f"latency {size}x{size}: median {statistics.median(times):.2f} s, min {min(times):.2f} s over {len(times)} requests")
    contact_sheet(tiles, Path(args.sheet))
    print(f"contact sheet: {args.sheet}")


if __name__ == "__main__":
    main()
