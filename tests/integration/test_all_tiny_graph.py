"""Every architecture of the all-tiny registry on the real Ray Serve graph,
through the official openai client: each id makes an image at two sizes (the
second streamed, with partial images before the completed one), and each
edit model edits (masks composited back, several images for Edit-Plus).

The graph is the project's builder on the args of
configs/serve_config.all-tiny.yaml (its stage options: fractional CPUs, one
torch thread per replica), with the tiny models of the session's
``tiny_model_dir`` cache. Its cost is one Ray worker process per replica,
each importing torch, diffusers and transformers (~4.5 s of CPU and
~350 MiB before any model): all 13 pipelines at once (39 stage replicas, the
ingress, post-processor and sweeper) took 8 minutes to start on the 2-core
machine and would hold ~14 GiB. So the registry is served in three groups
of architectures, one application at a time (at most 18 replicas, ~6 GiB),
each built from the same args with the registry cut to the group; every id
of the registry is in exactly one group (checked below). Measured on the
shared 2-core machine: 50-100 s per group, nearly all of it replicas
starting; the requests take 2 s a group, Qwen-Image-Edit(-Plus) ~20 s (their
VAE encodes each input image at a megapixel, as diffusers' pipelines do).

At about four minutes it does not fit the default suite's ten-minute budget
on the 2-core machine, so it is marked ``heavy`` and left out of
``scripts/test``; run it with ``scripts/test -m heavy``. Each architecture
is also exercised through the in-process ingress in the default suite
(tests/pipeline/test_all_architectures.py).
"""

from __future__ import annotations

import base64
import io
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml
from openai import OpenAI
from PIL import Image

from tests.unit.test_edits_http import band_mask, png

pytestmark = [pytest.mark.ray, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "configs" / "serve_config.all-tiny.yaml"
APP = "images-all-tiny"

# Each group is one application on the graph at a time (at most 5 pipelines:
# 18 replicas). Grouped by family, so that a failure points at one.
GROUPS = {
    "sd": ["tiny-sd", "tiny-sdxl", "tiny-sd-inpaint", "tiny-sd3"],
    "flux": ["tiny-flux-dev", "tiny-flux-schnell", "tiny-flux-fill", "tiny-flux-kontext", "tiny-flux2-klein"],
    "qwen-z": ["tiny-qwen-image", "tiny-qwen-image-edit", "tiny-qwen-image-edit-plus", "tiny-z-image"],
}
# How each edit model edits: with a mask (composited back), or by
# reference, with this many input images. Every other id generates from text.
EDITS = {
    "tiny-sd-inpaint": ("mask", 1),
    "tiny-flux-fill": ("mask", 1),
    "tiny-flux-kontext": ("reference", 1),
    "tiny-flux2-klein": ("reference", 1),
    "tiny-qwen-image-edit": ("reference", 1),
    "tiny-qwen-image-edit-plus": ("reference", 2),
}
# Free sizes (gpt-image-2): small, and one not square, so that a swapped
# width and height shows.
SIZES = ("64x64", "128x64")
PARTIAL_IMAGES = 2


def all_tiny_args() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]


def all_tiny_registry() -> dict:
    return yaml.safe_load((ROOT / all_tiny_args()["models"]).read_text())


def test_the_groups_cover_the_registry_once():
    grouped = [model for group in GROUPS.values() for model in group]
    ids = [m["id"] for m in all_tiny_registry()["models"] if m["id"] != "dall-e-2"]
    assert sorted(grouped) == sorted(ids) and len(set(grouped)) == len(grouped)


@contextmanager
def group_app(name: str, service_url: str, tiny_model_dir, root: Path) -> Iterator[OpenAI]:
    """An application serving one group's pipelines, built by the project's
    builder from the all-tiny args with the registry cut to the group; the
    openai client for it; the application removed afterwards."""
    from ray import serve

    from serve_app.app import build_app

    ids = GROUPS[name]
    registry = all_tiny_registry()
    pipelines = {p: registry["pipelines"][p] for p in ids}
    for pipeline in pipelines.values():
        pipeline["source"] = str(tiny_model_dir(pipeline.pop("builtin")))
    registry.update(
        pipelines=pipelines,
        models=[m for m in registry["models"] if m["id"] in ids],
        default_model=ids[0],
        default_gpt_image_model=ids[0],
    )
    (root / "models.yaml").write_text(yaml.safe_dump(registry))
    args = {**all_tiny_args(), "models": str(root / "models.yaml"), "data_dir": str(root / "data")}
    serve.run(build_app(args), name=APP, route_prefix="/all-tiny")
    try:
        # The all-tiny config sets no API key; the client must send one anyway.
        yield OpenAI(base_url=f"{service_url}/all-tiny/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.delete(APP)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode(b64: str) -> np.ndarray:
    return pixels(base64.b64decode(b64))


def source_image(width: int, height: int, flip: bool = False) -> bytes:
    image = Image.open(io.BytesIO(png((width, height))))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_image(client, model: str, size: str, **stream):
    """One image of ``model`` at ``size``: generated from text, or edited the
    model's way. Returns the response (or the event stream) and, for a
    masked edit, (source pixels, mask alpha)."""
    width, height = map(int, size.split("x"))
    # Streamed: medium, 4 steps (Z-Image 8), room for two previews before the
    # last step (masked edits repaint the whole schedule). Otherwise low, 2 steps.
    quality = "medium" if stream else "low"
    common = dict(model=model, prompt="a red circle", size=size, quality=quality, **stream)
    if model not in EDITS:
        return client.images.generate(**common), None
    how, count = EDITS[model]
    images = [source_image(width, height, flip=i % 2 == 1) for i in range(count)]
    files = [(f"image{i}.png", data, "image/png") for i, data in enumerate(images)]
    if how == "mask":
        mask, alpha = band_mask((width, height))
        result = client.images.edit(image=files[0], mask=("mask.png", mask, "image/png"), **common)
        return result, (pixels(images[0]), alpha)
    return client.images.edit(image=files if count > 1 else files[0], **common), None


def check_mask_kept(out: np.ndarray, masked) -> None:
    if masked is None:
        return
    source, alpha = masked
    keep = alpha == 255
    assert np.array_equal(out[keep], source[keep]), "pixels outside the mask must be the input's"
    assert not np.array_equal(out[~keep], source[~keep]), "the masked band was not edited"


def check_model(client: OpenAI, model: str) -> None:
    """One image at the first size; then one streamed at the second, with
    its partial images first."""
    plain_size, streamed_size = SIZES
    result, masked = make_image(client, model, plain_size)
    width, height = map(int, plain_size.split("x"))
    out = decode(result.data[0].b64_json)
    assert out.shape == (height, width, 3)
    check_mask_kept(out, masked)

    stream, masked = make_image(client, model, streamed_size, stream=True, partial_images=PARTIAL_IMAGES)
    events = list(stream)
    kind = "image_edit" if model in EDITS else "image_generation"
    assert [e.type for e in events] == [f"{kind}.partial_image"] * PARTIAL_IMAGES + [f"{kind}.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(PARTIAL_IMAGES))
    width, height = map(int, streamed_size.split("x"))
    pictures = [decode(e.b64_json) for e in events]
    assert all(p.shape == (height, width, 3) for p in pictures)
    assert not np.array_equal(pictures[0], pictures[-1]), "a preview is the image before its last steps"
    check_mask_kept(pictures[-1], masked)
    assert events[-1].usage.output_tokens > 0


def failure(client: OpenAI, model: str) -> str | None:
    try:
        check_model(client, model)
    except Exception as exc:  # noqa: BLE001 - reported per model below
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return f"line {frame.lineno}: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("group", GROUPS)
def test_each_id_makes_images_at_two_sizes_and_streams_partials(service_url, tiny_model_dir, tmp_path, group):
    """One application per group, its models checked concurrently (each has
    its own replicas), every model's failure reported."""
    models = GROUPS[group]
    with group_app(group, service_url, tiny_model_dir, tmp_path) as client, ThreadPoolExecutor(len(models)) as pool:
        failures = dict(zip(models, pool.map(lambda model: failure(client, model), models)))
    assert not {m: f for m, f in failures.items() if f}
