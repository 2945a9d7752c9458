"""The shipped embedded model through the real in-process graph (ingress,
text encoder, denoiser, VAE, post-processor), driven by the official openai
client: it draws what it is asked, well enough to catch a broken pipeline
(swapped guidance halves, the wrong prompt, a lost mask), not to grade art.
Scores of the model itself are scripts/eval_embedded_model.py's job."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.config import PROJECT_ROOT
from serve_app.pipeline.scenes import Scene, Shape, caption, nearest_colour, render
from tests.conftest import TEST_API_KEY, in_process_app

SHIPPED_MODELS = PROJECT_ROOT / "configs" / "models.yaml"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The openai client talking to the in-process ingress over the shipped
    registry, i.e. the committed embedded model at its default steps."""
    from fastapi.testclient import TestClient

    with TestClient(in_process_app(SHIPPED_MODELS, tmp_path_factory.mktemp("embedded"))) as http:
        yield openai.OpenAI(api_key=TEST_API_KEY, base_url="http://testserver/v1", http_client=http, max_retries=0)


def decode(b64: str, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert(mode))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def region_colour(image: np.ndarray, left: float, top: float, right: float, bottom: float) -> str:
    """The named colour of a region given as fractions of the frame (its median, robust to an edge)."""
    h, w = image.shape[:2]
    patch = image[int(top * h) : int(bottom * h), int(left * w) : int(right * w)].reshape(-1, 3)
    return nearest_colour(np.median(patch, axis=0))


def border_colour(image: np.ndarray) -> str:
    h, w = image.shape[:2]
    m = max(2, h // 32)
    border = np.concatenate([image[:m].reshape(-1, 3), image[-m:].reshape(-1, 3), image[:, :m].reshape(-1, 3), image[:, -m:].reshape(-1, 3)])
    return nearest_colour(np.median(border, axis=0))


@pytest.mark.parametrize(
    "prompt, shape_at, shape, background",
    [
        ("a large red square in the centre on a blue background", (0.4, 0.4, 0.6, 0.6), "red", "blue"),
        ("a large yellow circle on the left, black background", (0.17, 0.42, 0.33, 0.58), "yellow", "black"),
    ],
)
def test_named_colours_come_out_where_asked(client, prompt, shape_at, shape, background):
    img = client.images.generate(prompt=prompt, model="dall-e-2", size="256x256", response_format="b64_json", extra_body={"seed": 1})
    image = decode(img.data[0].b64_json)
    assert region_colour(image, *shape_at) == shape
    assert border_colour(image) == background


@pytest.mark.parametrize("style", ["vivid", "natural"])
def test_each_dall_e_3_style_draws_the_caption(client, style):
    # dall-e-3's styles reach the model as guidance and a prompt template;
    # words the model never saw (a real model's "vivid colors, dramatic
    # lighting") would turn this scene into a jumble.
    img = client.images.generate(
        prompt="a large red square in the centre on a blue background", model="dall-e-3", size="1024x1024",
        style=style, response_format="b64_json", extra_body={"seed": 1},
    )
    image = decode(img.data[0].b64_json)
    assert region_colour(image, 0.4, 0.4, 0.6, 0.6) == "red"
    assert border_colour(image) == "blue"


def inpaint(client, masked: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A large red circle on the left of a white scene, one half (``masked``:
    "left" or "right") repainted for "a large blue square on the right, white
    background": (before, after, alpha), alpha 0 where repainted."""
    scene = Scene("white", (Shape("circle", "red", "large", "left"),))
    original = render(scene, 256)
    alpha = np.full((256, 256), 255, np.uint8)
    alpha[:, {"left": slice(None, 128), "right": slice(128, None)}[masked]] = 0
    mask = original.copy()
    mask.putalpha(Image.fromarray(alpha))
    img = client.images.edit(
        image=("scene.png", png(original), "image/png"), mask=("mask.png", png(mask), "image/png"),
        prompt="a large blue square on the right, white background", model="dall-e-2", size="256x256",
        response_format="b64_json", extra_body={"seed": 2},
    )
    return np.asarray(original), decode(img.data[0].b64_json), alpha


def test_inpaint_changes_the_masked_region_and_keeps_the_rest(client):
    # The circle is masked and the caption has none on the left: the
    # repainted half loses it (backgrounds are what the model draws best),
    # and the other half comes back as it was.
    before, after, alpha = inpaint(client, "left")
    keep = alpha == 255
    assert np.abs(after[keep].astype(int) - before[keep]).max() <= 8
    assert np.abs(after[~keep].astype(float) - before[~keep]).mean() > 10
    assert region_colour(before, 0.17, 0.42, 0.33, 0.58) == "red"
    assert region_colour(after, 0.17, 0.42, 0.33, 0.58) != "red"


def test_inpaint_draws_what_is_asked_in_the_mask(client):
    before, after, _ = inpaint(client, "right")
    assert region_colour(after, 0.65, 0.4, 0.85, 0.6) == "blue"
    assert region_colour(before, 0.65, 0.4, 0.85, 0.6) == "white"


def test_transparent_background_leaves_a_circle_opaque(client):
    img = client.images.generate(
        prompt="a red circle on a white background", model="gpt-image-1", size="1024x1024", quality="low",
        background="transparent", output_format="png", extra_body={"seed": 3},
    )
    rgba = decode(img.data[0].b64_json, "RGBA")
    opaque = rgba[..., 3] > 128
    ys, xs = np.nonzero(opaque)
    assert len(ys) > 0.02 * opaque.size, "nearly nothing opaque"
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    # A circle fills pi/4 of its bounding box; a square would fill all of it, a triangle half.
    assert 0.65 < opaque.sum() / box < 0.9
    assert nearest_colour(np.median(rgba[opaque][:, :3], axis=0)) == "red"
    assert rgba[0, 0, 3] < 128  # the backdrop is gone


def test_partial_previews_converge_to_the_final_image(client):
    events = list(
        client.images.generate(
            prompt=caption(Scene("green", (Shape("triangle", "orange", "large", "centre"),)), random.Random(0)),
            model="gpt-image-2", size="256x256", stream=True, partial_images=3, extra_body={"seed": 4},
        )
    )
    partials = [decode(e.b64_json).astype(float) for e in events if e.type == "image_generation.partial_image"]
    final = decode(events[-1].b64_json).astype(float)
    assert events[-1].type == "image_generation.completed" and len(partials) == 3
    distances = [np.abs(p - final).mean() for p in partials]
    assert distances[-1] < distances[0]
    assert distances[-1] < 0.5 * distances[0] or distances[-1] < 4

