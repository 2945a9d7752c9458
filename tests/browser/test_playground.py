"""The playground page in headless Chromium, against the real ingress app.

Each test does what a user does (types, clicks, presses keys, paints with the
mouse) and checks what the page shows and what went over the wire.
"""

from __future__ import annotations

import base64
import io
import json
import math

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TEST_API_KEY

pytestmark = pytest.mark.browser

KEY_STORAGE = "images-playground.api-key"


def open_playground(page, server, path: str = "/", with_key: bool = True) -> None:
    """Load the page; with_key puts the key in the tab's sessionStorage first,
    where the page keeps it once a user has entered it."""
    if with_key:
        page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": f"sessionStorage.setItem({json.dumps(KEY_STORAGE)}, {json.dumps(TEST_API_KEY)});"},
        )
    page.goto(server.url + path)
    if with_key:
        page.wait_for("document.querySelectorAll('#model option').length > 0")


def api_calls(page, route: str) -> list[dict]:
    return [r for r in page.requests() if r["url"].split("?")[0].endswith(route)]


def small_size_model(base_url: str) -> dict:
    """A model that renders 256x256 (its family takes free sizes), with the
    most quality tiers, so that its highest has the most steps and the
    previews come well before the end."""
    models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"}).json()["data"]
    return max((m for m in models if m.get("max_pixels")), key=lambda m: len(m["qualities"]))


def api_error(server, body: dict) -> dict:
    resp = httpx.post(f"{server.url}/v1/images/generations", headers={"Authorization": f"Bearer {TEST_API_KEY}"}, json=body)
    assert resp.status_code == 400
    return resp.json()["error"]


def test_page_loads_under_its_csp_with_no_error(page, playground_server):
    open_playground(page, playground_server)
    models = httpx.get(f"{playground_server.url}/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"}).json()
    shown = page.evaluate("[...document.querySelectorAll('#model option')].map((o) => o.value)")
    assert shown == [m["id"] for m in models["data"]]
    # The size list is the chosen model's own, as /v1/models advertises it.
    chosen = next(m for m in models["data"] if m["id"] == page.evaluate("document.querySelector('#model').value"))
    # Then a custom WxH where the model takes any size (max_pixels), whose fate the server decides.
    custom = ["custom"] if chosen.get("max_pixels") else []
    assert page.evaluate("[...document.querySelectorAll('#size option')].map((o) => o.value)") == chosen["sizes"] + custom
    fixed = next(m for m in models["data"] if not m.get("max_pixels"))
    page.choose("#model", fixed["id"])
    assert page.evaluate("[...document.querySelectorAll('#size option')].map((o) => o.value)") == fixed["sizes"]
    assert page.problems() == []
    assert page.network_errors() == []
    # Nothing from another host: every request went to the page's own origin.
    urls = [r["url"] for r in page.requests()]
    assert urls and all(u.startswith(playground_server.url + "/") or u.startswith("data:") for u in urls), urls

    # The watcher above does see a violation: an inline style attribute is refused.
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')")
    page.wait_for("window.__cspViolations.length > 0")
    assert any("style-src" in p for p in page.problems())


def test_generation_streams_previews_then_the_final_image_with_its_seed(page, playground_server, tmp_path):
    open_playground(page, playground_server)
    assert "(gpt-image" in page.evaluate("document.querySelector('#model').selectedOptions[0].textContent"), (
        "the page starts on a model that streams"
    )
    model = small_size_model(playground_server.url)
    page.choose("#model", model["id"])
    page.choose("#quality", [q for q in model["qualities"] if q != "auto"][-1])
    page.choose("#size", "custom")
    page.type_into("#size-custom", "256x256")
    page.evaluate("document.querySelector('#partial_images').value = '2'")
    # Every state a result card goes through, and every image the browser decoded for it.
    page.evaluate(
        """(() => {
          const results = document.getElementById('results');
          window.__states = []; window.__loads = [];
          new MutationObserver((changes) => { for (const c of changes) window.__states.push([c.target.dataset.state, c.target.querySelector('img').src]); })
            .observe(results, {subtree: true, attributes: true, attributeFilter: ['data-state']});
          results.addEventListener('load', (e) => window.__loads.push(e.target.closest('.result').dataset.state), true);
        })()"""
    )
    page.type_into("#prompt", "a lighthouse at dusk")
    page.press_enter(ctrl=True)
    page.wait_for("document.querySelector('.result[data-state=final] .seed')?.textContent", timeout=120)
    page.wait_for("window.__loads.includes('final')")

    states = page.evaluate("window.__states")
    kinds = [s for s, _ in states]
    assert "partial" in kinds and kinds[-1] == "final" and kinds.index("partial") < kinds.index("final"), kinds
    assert len({src for _, src in states}) == len(states), "each preview and the final image are new images"
    assert page.evaluate("document.querySelectorAll('.result').length") == 1, "previews replace each other in place"
    assert "partial" in page.evaluate("window.__loads"), "a preview was decoded and shown before the final image"

    # The seed shown is the one the page sent (it picked one: the field was empty).
    sent = json.loads(api_calls(page, "/v1/images/generations")[0]["postData"])
    assert sent["stream"] is True and sent["partial_images"] == 2 and sent["size"] == "256x256"
    shown = page.evaluate("document.querySelector('.result .seed').textContent")
    assert shown == str(sent["seed"])
    card = page.evaluate(
        """(() => { const c = document.querySelector('.result');
          return {size: c.querySelector('.size').textContent, time: c.querySelector('.time').textContent,
                  usage: c.querySelector('.usage').textContent, usageShown: !c.querySelector('.usage-row').hidden,
                  download: c.querySelector('a.download').getAttribute('download'), href: c.querySelector('a.download').href,
                  badge: c.querySelector('.badge').textContent}; })()"""
    )
    assert card["size"] == "256x256"
    assert card["time"].endswith(" s") and float(card["time"][:-2]) > 0
    assert card["usageShown"] and "tokens" in card["usage"]
    assert card["download"] == f"image-{shown}.png" and card["href"].startswith("blob:")
    assert card["badge"] == ""

    # And that seed reproduces the image: the same request, not streamed, gives the same pixels.
    final_b64 = page.evaluate(
        """(() => { const img = document.querySelector('.result img'); const c = document.createElement('canvas');
          c.width = img.naturalWidth; c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0);
          return c.toDataURL('image/png').split(',')[1]; })()"""
    )
    again = httpx.post(
        f"{playground_server.url}/v1/images/generations",
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        json={k: v for k, v in sent.items() if k not in ("stream", "partial_images")},
        timeout=120,
    ).json()
    assert again["data"][0]["seed"] == sent["seed"]
    shown_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(final_b64))).convert("RGB"))
    api_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(again["data"][0]["b64_json"]))).convert("RGB"))
    assert np.array_equal(shown_pixels, api_pixels)

    shot = page.screenshot(tmp_path / "playground-generated.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 10, "the screenshot is not blank"
    assert page.problems() == []


def test_api_error_is_shown_next_to_the_field_it_names(page, playground_server):
    open_playground(page, playground_server)
    dalle2 = page.evaluate("[...document.querySelectorAll('#model option')].find((o) => o.textContent.includes('(dall-e-2)')).value")
    page.choose("#model", dalle2)
    page.choose("#size", "256x256")
    page.evaluate("document.querySelector('#prompt').value = 'x'.repeat(40000)")
    page.click("#run-button")
    message = page.wait_for("document.querySelector('.field-error[data-for=prompt]').textContent", timeout=30)
    # The API's own words, for the field it named.
    expected = api_error(playground_server, {"prompt": "x" * 40000, "model": dalle2})
    assert expected["param"] == "prompt" and message == expected["message"]
    assert page.evaluate("document.querySelector('#prompt').getAttribute('aria-invalid')") == "true"
    assert page.evaluate("document.querySelector('#form-error').hidden")
    assert page.evaluate("document.querySelectorAll('.result').length") == 0

    # A size the family refuses: its message, under size.
    gpt = small_size_model(playground_server.url)["id"]
    page.choose("#model", gpt)
    page.choose("#size", "custom")
    page.type_into("#size-custom", "100x100")
    page.evaluate("document.querySelector('#prompt').value = 'otter'")
    page.click("#run-button")
    message = page.wait_for("document.querySelector('.field-error[data-for=size]').textContent", timeout=30)
    expected = api_error(playground_server, {"prompt": "otter", "model": gpt, "size": "100x100"})
    assert expected["param"] == "size" and message == expected["message"]
    assert page.evaluate("document.querySelector('.field-error[data-for=prompt]').textContent") == "", "cleared on the next try"

    # Fixed, with a seed typed in and not streamed: the answer's own seed
    # (data[0].seed) is shown, and the error is gone.
    page.choose("#model", dalle2)
    page.choose("#size", "256x256")
    page.click("#stream")
    assert page.evaluate("document.querySelector('#partial-field').hidden")
    page.evaluate("document.querySelector('#prompt').value = ''")
    page.type_into("#prompt", "otter")
    page.type_into("#seed", "4242")
    page.press_enter(ctrl=True)
    page.wait_for("document.querySelector('.result[data-state=final] .seed')?.textContent === '4242'", timeout=120)
    sent = json.loads(api_calls(page, "/v1/images/generations")[-1]["postData"])
    assert sent["seed"] == 4242 and "stream" not in sent
    assert page.evaluate("document.querySelector('.field-error[data-for=prompt]').textContent") == ""
    assert page.problems() == []


def test_api_key_is_asked_once_kept_in_session_storage_and_sent_only_as_a_header(page, playground_server):
    open_playground(page, playground_server, with_key=False)
    page.wait_for("!document.querySelector('#key-panel').hidden")
    assert page.evaluate("document.querySelectorAll('#model option').length") == 0
    # The server's 401 message, as the page shows it.
    assert "API key" in page.evaluate("document.querySelector('#key-message').textContent")

    page.type_into("#api-key", TEST_API_KEY)
    page.press_enter()
    page.wait_for("document.querySelectorAll('#model option').length > 0")
    assert page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_STORAGE)})") == TEST_API_KEY
    assert page.evaluate("document.querySelector('#key-panel').hidden")
    assert page.evaluate("document.querySelector('#api-key').value") == ""

    # Enter anywhere in the form generates, with the key as a Bearer header.
    page.choose("#model", page.evaluate("[...document.querySelectorAll('#model option')].find((o) => o.textContent.includes('(dall-e-2)')).value"))
    page.choose("#size", "256x256")
    page.type_into("#prompt", "otter")
    page.evaluate("document.querySelector('#n').focus()")
    page.press_enter()
    page.wait_for("!!document.querySelector('.result[data-state=final]')", timeout=120)

    models_calls = api_calls(page, "/v1/models")
    assert [c["headers"].get("Authorization") for c in models_calls] == [None, f"Bearer {TEST_API_KEY}"]
    generations = api_calls(page, "/v1/images/generations")
    assert len(generations) == 1 and generations[0]["headers"]["Authorization"] == f"Bearer {TEST_API_KEY}"
    for request in page.requests():
        assert TEST_API_KEY not in request["url"]
    assert TEST_API_KEY not in page.evaluate("location.href")
    # The only failure the browser logged is the first, keyless, /v1/models.
    assert len(page.network_errors()) == 1 and "401" in page.network_errors()[0]
    assert page.problems() == []


def test_phone_width_has_no_horizontal_overflow(page, playground_server):
    page.call("Emulation.setDeviceMetricsOverride", {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
    open_playground(page, playground_server, path="/playground")
    for mode in ("generate", "edit"):
        page.click(f"#tab-{mode}")
        widths = page.evaluate(
            """(() => ({doc: document.documentElement.scrollWidth, view: document.documentElement.clientWidth,
                widest: Math.max(...[...document.querySelectorAll('body *')].filter((e) => e.getClientRects().length)
                                    .map((e) => e.getBoundingClientRect().right))}))()"""
        )
        assert widths["doc"] <= widths["view"] == 360, (mode, widths)
        assert widths["widest"] <= 360 + 0.5, (mode, widths)
    # One column: the results sit below the form.
    assert page.evaluate(
        "document.querySelector('.results').getBoundingClientRect().top >= document.querySelector('#request-form').getBoundingClientRect().bottom"
    )
    assert page.problems() == []


def _stroke_distance(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance of each pixel centre to the segment a-b."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(x - (ax + t * dx), y - (ay + t * dy))


def paint_stroke(page, brush: int = 24):
    """Drag the mouse across the middle of the mask canvas, from a quarter to
    three quarters of its width; returns the canvas rectangle and the stroke's ends."""
    page.evaluate(f"document.querySelector('#brush-size').value = '{brush}'")
    rect = page.evaluate(
        "(() => { const c = document.querySelector('#mask-canvas'); c.scrollIntoView({block: 'center'});"
        " const r = c.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; })()"
    )
    start, end = (rect["x"] + rect["w"] * 0.25, rect["y"] + rect["h"] * 0.5), (rect["x"] + rect["w"] * 0.75, rect["y"] + rect["h"] * 0.5)
    page.mouse("mouseMoved", *start)
    page.mouse("mousePressed", *start)
    for i in range(1, 11):
        page.mouse("mouseMoved", start[0] + (end[0] - start[0]) * i / 10, start[1], buttons=1)
    page.mouse("mouseReleased", *end)
    return rect, start, end


def test_edit_sends_image_and_painted_mask_as_the_sdks_do(page, playground_server, tmp_path):
    open_playground(page, playground_server)
    page.click("#tab-edit")
    assert page.evaluate("document.querySelector('#run-button').textContent") == "Edit"
    # A 320x192 picture to edit, picked with the file input.
    source = tmp_path / "source.png"
    ramp = np.linspace(0, 255, 320, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (192, 1))] * 3, axis=-1)).save(source)
    node = page.call("DOM.querySelector", {"nodeId": page.call("DOM.getDocument")["root"]["nodeId"], "selector": "#edit-image"})
    page.call("DOM.setFileInputFiles", {"files": [str(source)], "nodeId": node["nodeId"]})
    page.wait_for("!document.querySelector('#mask-stage').hidden && document.querySelector('#mask-canvas').width === 320")

    # Paint one horizontal stroke with the mouse, then submit with Enter.
    rect, start, end = paint_stroke(page)
    scale = 320 / rect["w"]
    page.type_into("#prompt", "add a red boat")
    page.press_enter(ctrl=True)
    page.wait_for("!!document.querySelector('.result[data-state=final]')", timeout=30)

    edits = [r for r in playground_server.recorded if r.path == "/v1/images/edits"]
    assert len(edits) == 1
    got = edits[0]
    assert got.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert got.headers["content-type"].startswith("multipart/form-data; boundary=")
    image, mask = got.fields["image"][0], got.fields["mask"][0]
    assert image.content_type == "image/png" and image.filename
    assert image.data == source.read_bytes(), "a PNG is sent as it was picked"
    assert mask.content_type == "image/png" and mask.filename
    alpha = np.asarray(Image.open(io.BytesIO(mask.data)).convert("RGBA"))[..., 3]
    assert alpha.shape == (192, 320)
    assert set(np.unique(alpha)) == {0, 255}
    # Alpha 0 exactly where the brush went: every pixel well inside the stroke,
    # none well outside it (a pixel either side of its edge may go either way).
    radius = 12 * scale
    ys, xs = np.mgrid[0:192, 0:320] + 0.5
    a = ((start[0] - rect["x"]) * scale, (start[1] - rect["y"]) * scale)
    b = ((end[0] - rect["x"]) * scale, (end[1] - rect["y"]) * scale)
    distance = _stroke_distance(xs, ys, a, b)
    assert (alpha[distance < radius - 1.5] == 0).all()
    assert (alpha[distance > radius + 1.5] == 255).all()
    assert math.isclose((alpha == 0).sum(), 2 * radius * math.dist(a, b) + math.pi * radius**2, rel_tol=0.1)

    text = {name: parts[0].text for name, parts in got.fields.items() if name not in ("image", "mask")}
    assert text["prompt"] == "add a red boat"
    assert text["model"] == page.evaluate("document.querySelector('#model').value")
    assert text["response_format"] == "b64_json"
    # A gpt-image model streams the edit; the page shows the seed it sent.
    assert text["stream"] == "true" and text["seed"].isdigit()
    assert page.evaluate("document.querySelector('.result .seed').textContent") == text["seed"]
    assert page.problems() == []

    # Variations: shown for the dall-e-2 family only; image, model, n, size.
    assert page.evaluate("document.querySelector('#variations-button').hidden")
    dalle2 = page.evaluate("[...document.querySelectorAll('#model option')].find((o) => o.textContent.includes('(dall-e-2)')).value")
    page.choose("#model", dalle2)
    page.choose("#size", "256x256")
    page.click("#variations-button")
    page.wait_for("document.querySelectorAll('.result[data-state=final]').length === 2", timeout=30)
    variation = [r for r in playground_server.recorded if r.path == "/v1/images/variations"][-1]
    assert variation.fields["image"][0].data == source.read_bytes()
    assert {k: v[0].text for k, v in variation.fields.items() if k != "image"} == {
        "model": dalle2, "size": "256x256", "n": "1", "response_format": "b64_json",
    }
    assert page.problems() == []
