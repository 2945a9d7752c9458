"""Every architecture of the all-tiny registry on the real Ray Serve graph,
through the official openai client: each id makes an image at two sizes (the
second streamed, with partial images before the completed one), and each
edit model edits (masks composited back, several images for Edit-Plus).

The graph is the project's builder on the args of
configs/serve_config.all-tiny.yaml, as ``serve run`` would deploy it: its
stage group puts all thirteen pipelines on one replica of each model stage,
so the application is six processes (a replica per pipeline and stage was 39
processes, eight minutes to start on the 2-core machine). The tiny models
come from the session's ``tiny_model_dir`` cache.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from openai import OpenAI
from PIL import Image

from tests.unit.test_edits_http import band_mask, png

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "configs" / "serve_config.all-tiny.yaml"
APP = "images-all-tiny"

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


def tiny_ids() -> list[str]:
    return [m["id"] for m in all_tiny_registry()["models"] if m["id"] != "dall-e-2"]


def test_every_pipeline_is_in_the_one_stage_group():
    args = all_tiny_args()
    assert list(args["stage_groups"]) == ["tiny"]
    assert sorted(args["stage_groups"]["tiny"]) == sorted(all_tiny_registry()["pipelines"])


@pytest.fixture(scope="module")
def all_tiny_client(service_url, tiny_model_dir, tmp_path_factory):
    """The all-tiny application, built by the project's builder from the
    all-tiny args with the registry's sources at the session's tiny models;
    the openai client for it; the application removed afterwards."""
    from ray import serve

    from serve_app.app import build_app

    root = tmp_path_factory.mktemp("all-tiny")
    registry = all_tiny_registry()
    for pipeline in registry["pipelines"].values():
        pipeline["source"] = str(tiny_model_dir(pipeline.pop("builtin")))
    (root / "models.yaml").write_text(yaml.safe_dump(registry))
    args = {**all_tiny_args(), "models": str(root / "models.yaml"), "data_dir": str(root / "data")}
    serve.run(build_app(args), name=APP, route_prefix="/all-tiny")
    try:
        # The all-tiny config sets no API key; the client must send one anyway.
        yield OpenAI(base_url=f"{service_url}/all-tiny/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.delete(APP)


def test_the_stage_deployments_are_one_per_stage(all_tiny_client):
    from ray import serve

    deployments = set(serve.status().applications[APP].deployments)
    assert {d for d in deployments if d.split("-")[0] in ("TextEncoder", "Denoiser", "VaeDecoder")} == {
        "TextEncoder-tiny", "Denoiser-tiny", "VaeDecoder-tiny"
    }


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


@pytest.mark.parametrize("model", tiny_ids())
def test_each_id_makes_images_at_two_sizes_and_streams_partials(all_tiny_client, model):
    check_model(all_tiny_client, model)
