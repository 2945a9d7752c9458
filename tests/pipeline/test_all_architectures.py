"""Every architecture through the real ingress and the real stage classes
(in-process, without Ray): the all-tiny registry's ids generate at two
sizes, stream previews, and edit where the architecture edits.

The same registry runs on Ray with `serve run configs/serve_config.all-tiny.yaml`;
tests/integration/test_all_tiny_graph.py runs it on the real graph, in groups.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import TEST_API_KEY, TEST_SIGNING_KEY, LocalHandle, real_stages
from tests.unit.test_edits_http import band_mask, png

GEN = "/v1/images/generations"
EDITS = "/v1/images/edits"
ALL_TINY = Path(__file__).resolve().parents[2] / "configs" / "models.all-tiny.yaml"


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir):
    from fastapi.testclient import TestClient

    from serve_app.config import load_app_config
    from serve_app.deployments.ingress import ImagesIngress
    from serve_app.deployments.post_processor import PostProcessor

    registry = yaml.safe_load(ALL_TINY.read_text())
    for pipeline in registry["pipelines"].values():
        pipeline["source"] = str(tiny_model_dir(pipeline.pop("builtin")))
    root = tmp_path_factory.mktemp("all-tiny")
    (root / "models.yaml").write_text(yaml.safe_dump(registry))
    config, reg = load_app_config({"models": str(root / "models.yaml"), "data_dir": str(root / "data")})
    pipelines = real_stages(config, reg)
    ingress = ImagesIngress(config, reg, TEST_SIGNING_KEY, pipelines, LocalHandle(PostProcessor(config)))
    with TestClient(ingress.__serve_build_asgi_app__(), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {TEST_API_KEY}"
        yield c


GENERATORS = [
    "tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux-dev", "tiny-flux-schnell", "tiny-flux-kontext", "tiny-flux2-klein",
    "tiny-qwen-image", "tiny-z-image",
]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.mark.parametrize("model", GENERATORS)
def test_every_architecture_generates_at_two_sizes_and_streams(client, model):
    for size in ("256x256", "128x256"):
        resp = client.post(GEN, json={"model": model, "prompt": "a red circle", "size": size, "quality": "low"})
        assert resp.status_code == 200, resp.text
        w, h = map(int, size.split("x"))
        assert decode(resp.json()["data"][0]["b64_json"]).shape == (h, w, 3)
    resp = client.post(GEN, json={"model": model, "prompt": "a red circle", "size": "128x128", "quality": "high", "stream": True, "partial_images": 1})
    events = [line.split(": ", 1)[1] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "image_generation.partial_image" and events[-1] == "image_generation.completed", events


@pytest.mark.parametrize("model, masked", [
    ("tiny-sd", True), ("tiny-sdxl", True), ("tiny-sd-inpaint", True), ("tiny-sd3", True), ("tiny-sd3", False),
    ("tiny-flux-dev", False), ("tiny-flux-schnell", True), ("tiny-flux-fill", True), ("tiny-flux-fill", False), ("tiny-flux-kontext", False),
    ("tiny-flux2-klein", False), ("tiny-qwen-image-edit", False), ("tiny-z-image", True), ("tiny-z-image", False),
])
def test_each_edit_model_edits(client, model, masked):
    files = {"image": ("a.png", png(), "image/png")}
    if masked:
        files["mask"] = ("m.png", band_mask()[0], "image/png")
    resp = client.post(EDITS, files=files, data={"prompt": "a hat", "model": model, "size": "256x256", "quality": "high"})
    assert resp.status_code == 200, resp.text
    out = decode(resp.json()["data"][0]["b64_json"])
    if masked:
        keep = band_mask()[1] == 255
        assert np.array_equal(out[keep], np.asarray(Image.open(io.BytesIO(png())).convert("RGB"))[keep])


@pytest.mark.parametrize("model", ["tiny-flux-kontext", "tiny-flux2-klein"])
def test_a_masked_edit_the_architecture_cannot_make_is_a_400(client, model):
    files = {"image": ("a.png", png(), "image/png"), "mask": ("m.png", band_mask()[0], "image/png")}
    resp = client.post(EDITS, files=files, data={"prompt": "a hat", "model": model, "size": "256x256"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model", resp.text


def test_qwen_image_edit_models_take_their_own_number_of_images(client):
    """The image limit is the architecture's: Edit takes one, Edit-Plus several; more is a 400 naming the parameter."""
    two = [("image[]", ("a.png", png(), "image/png")), ("image[]", ("b.png", png(), "image/png"))]
    data = {"prompt": "a hat", "size": "128x128", "quality": "low"}
    resp = client.post(EDITS, files=two, data={**data, "model": "tiny-qwen-image-edit-plus"})
    assert resp.status_code == 200, resp.text
    assert decode(resp.json()["data"][0]["b64_json"]).shape == (128, 128, 3)
    resp = client.post(EDITS, files=two, data={**data, "model": "tiny-qwen-image-edit"})
    error = resp.json()["error"]
    assert resp.status_code == 400 and (error["param"], error["code"]) == ("image[]", "too_many_images"), resp.text
    resp = client.post(EDITS, files=two[:1], data={**data, "model": "tiny-sd"})
    assert resp.status_code == 200, resp.text
    resp = client.post(EDITS, files=two, data={**data, "model": "tiny-sd"})
    assert resp.status_code == 400 and "one image at a time" in resp.json()["error"]["message"]


@pytest.mark.parametrize("model", ["tiny-sd-inpaint", "tiny-flux-fill"])
def test_text_to_image_on_an_inpainting_only_model_is_a_400(client, model):
    resp = client.post(GEN, json={"model": model, "prompt": "a red circle", "size": "256x256", "quality": "low"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model", resp.text
    # Streamed, the refusal is the stream's error event.
    resp = client.post(GEN, json={"model": model, "prompt": "a red circle", "size": "256x256", "stream": True})
    events = [line for line in resp.text.splitlines() if line.startswith(("event: ", "data: "))]
    assert events[0] == "event: error" and '"param": "model"' in events[1], resp.text


@pytest.mark.parametrize("model", ["tiny-flux-kontext", "tiny-flux2-klein"])
def test_a_reference_edit_streams_a_preview_of_every_step_but_the_last(client, model):
    """A reference edit runs the whole schedule from noise (4 steps here),
    whatever the edit preset's strength: 3 partial images, then the image."""
    files = {"image": ("a.png", png(), "image/png")}
    data = {"prompt": "a hat", "model": model, "size": "256x256", "stream": "true", "partial_images": "3"}
    resp = client.post(EDITS, files=files, data=data)
    events = [line.split(": ", 1)[1] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events == ["image_edit.partial_image"] * 3 + ["image_edit.completed"], resp.text[:500]


@pytest.mark.parametrize("model, fidelity", [("tiny-sd3", "low"), ("tiny-flux-dev", "low"), ("tiny-z-image", "high")])
def test_an_image_to_image_edit_streams_previews_over_the_steps_its_architecture_runs(client, model, fidelity):
    """SD3, FLUX and Z-Image round an edit's steps x strength after taking it
    from the steps, SD before: 2 steps at 0.75 (Z-Image's low tier, 4 steps,
    at 0.45) run 2 steps here, where SD's rule counts 1, which leaves no room
    for a preview. The preview goes out after the first of the two."""
    files = {"image": ("a.png", png(), "image/png")}
    data = {"prompt": "a hat", "model": model, "size": "128x128", "quality": "low", "input_fidelity": fidelity,
            "stream": "true", "partial_images": "1"}
    resp = client.post(EDITS, files=files, data=data)
    events = [line.split(": ", 1)[1] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events == ["image_edit.partial_image", "image_edit.completed"], resp.text[:500]
