"""Edits and variations on the deployed graph, through the official openai client."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import TEST_API_KEY
from tests.unit.test_edits_http import band_mask, decode, png

pytestmark = pytest.mark.ray


def as_file(data: bytes, name: str = "image.png"):
    return (name, data, "image/png")


def test_edit_one_image(client):
    img = client.images.edit(image=as_file(png()), prompt="a red hat", model="dall-e-2", size="256x256", response_format="b64_json")
    assert len(img.data) == 1 and decode(img.data[0].b64_json).shape == (256, 256, 3)


def test_edit_with_a_mask_keeps_protected_pixels(client):
    mask, alpha = band_mask()
    source = png()
    img = client.images.edit(
        image=as_file(source), mask=as_file(mask, "mask.png"), prompt="a red hat", model="dall-e-2",
        size="256x256", response_format="b64_json",
    )
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    out = decode(img.data[0].b64_json)
    assert np.array_equal(out[alpha == 255], original[alpha == 255])


def test_a_list_of_images_is_refused_naming_image(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=[as_file(png()), as_file(png(), "b.png")], prompt="hat", model="gpt-image-1")
    assert e.value.body["param"] == "image[]" and "one image at a time" in e.value.body["message"]


def test_streamed_edit(client):
    events = list(
        client.images.edit(
            image=as_file(png()), prompt="hat", model="gpt-image-1", size="1024x1024", quality="low",
            stream=True, partial_images=1,
        )
    )
    assert events[-1].type == "image_edit.completed"
    assert decode(events[-1].b64_json).shape == (1024, 1024, 3)


def test_variations(client):
    img = client.images.create_variation(image=as_file(png()), n=2, size="256x256", response_format="b64_json")
    a, b = (decode(d.b64_json) for d in img.data)
    assert a.shape == (256, 256, 3) and not np.array_equal(a, b)


def test_json_body_and_image_on_generations(service_url):
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    data_url = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = {"prompt": "hat", "model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}
    resp = httpx.post(f"{service_url}/v1/images/edits", json={**body, "images": [{"image_url": data_url}]}, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    resp = httpx.post(f"{service_url}/api/images/generations", json={**body, "image": data_url}, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    assert decode(resp.json()["data"][0]["b64_json"]).shape == (256, 256, 3)


def test_an_allowed_image_url_is_fetched(service_url, image_server):
    url = image_server.put("/otter.png", png())
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    body = {"prompt": "hat", "model": "dall-e-2", "size": "256x256", "response_format": "b64_json", "images": [{"image_url": url}]}
    resp = httpx.post(f"{service_url}/v1/images/edits", json=body, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    missing = {**body, "images": [{"image_url": url.replace("otter", "nothing")}]}
    resp = httpx.post(f"{service_url}/v1/images/edits", json=missing, headers=headers, timeout=120)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "images[0].image_url"
