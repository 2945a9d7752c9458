"""The playground page served by the real Ray Serve graph, in headless Chromium:
the page, its assets and its API calls go through Serve's HTTP proxy."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import chromium, page  # noqa: F401 - fixtures
from tests.browser.test_playground import KEY_STORAGE, paint_stroke, small_size_model
from tests.conftest import TEST_API_KEY

pytestmark = [pytest.mark.ray, pytest.mark.browser]


def test_playground_streams_a_generation_through_the_graph(page, service_url):  # noqa: F811 - fixture
    page.goto(service_url + "/playground")
    page.wait_for("!document.querySelector('#key-panel').hidden")
    page.type_into("#api-key", TEST_API_KEY)
    page.press_enter()
    page.wait_for("document.querySelectorAll('#model option').length > 0", timeout=60)
    assert page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_STORAGE)})") == TEST_API_KEY
    page.choose("#model", small_size_model(service_url)["id"])
    page.choose("#size", "custom")
    page.type_into("#size-custom", "256x256")
    # The highest tier (the most steps), so that the previews come well before the end.
    page.choose("#quality", page.evaluate("[...document.querySelectorAll('#quality option')].map((o) => o.value).filter((q) => q !== 'auto').pop()"))
    page.evaluate(
        "window.__states = []; new MutationObserver((cs) => cs.forEach((c) => window.__states.push(c.target.dataset.state)))"
        ".observe(document.getElementById('results'), {subtree: true, attributes: true, attributeFilter: ['data-state']})"
    )
    page.type_into("#prompt", "a lighthouse at dusk")
    page.press_enter(ctrl=True)
    page.wait_for("!!document.querySelector('.result[data-state=final]')", timeout=180)
    states = page.evaluate("window.__states")
    assert states[0] == "partial" and states[-1] == "final", states
    sent = json.loads([r for r in page.requests() if r["url"].endswith("/v1/images/generations")][0]["postData"])
    assert page.evaluate("document.querySelector('.result .seed').textContent") == str(sent["seed"])
    assert page.evaluate("document.querySelector('.result .size').textContent") == "256x256"
    assert page.problems() == []



def test_playground_edits_with_a_painted_mask_through_the_graph(page, service_url, tmp_path):  # noqa: F811 - fixture
    """Paint a mask, edit through the real /v1/images/edits, see the result:
    far from the stroke the result is the picked image's own pixels."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    page.goto(service_url + "/playground")
    page.evaluate(f"sessionStorage.setItem({json.dumps(KEY_STORAGE)}, {json.dumps(TEST_API_KEY)})")
    page.goto(service_url + "/playground")
    page.wait_for("document.querySelectorAll('#model option').length > 0", timeout=60)
    page.click("#tab-edit")
    page.choose("#model", "dall-e-2")
    page.choose("#size", "256x256")
    source = tmp_path / "source.png"
    y, x = np.mgrid[0:256, 0:256]
    Image.fromarray(np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)).save(source)
    node = page.call("DOM.querySelector", {"nodeId": page.call("DOM.getDocument")["root"]["nodeId"], "selector": "#edit-image"})
    page.call("DOM.setFileInputFiles", {"files": [str(source)], "nodeId": node["nodeId"]})
    page.wait_for("!document.querySelector('#mask-stage').hidden && document.querySelector('#mask-canvas').width === 256")
    paint_stroke(page)
    page.type_into("#prompt", "a red boat")
    page.press_enter(ctrl=True)
    page.wait_for("!!document.querySelector('.result[data-state=final]')", timeout=180)
    # The image the page shows, read back through a canvas (lossless PNG; the
    # page's CSP lets no script fetch its blob: URL, rightly).
    b64 = page.evaluate(
        "(() => { const img = document.querySelector('.result[data-state=final] img');"
        " const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;"
        " c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png').split(',')[1]; })()"
    )
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    original = np.asarray(Image.open(source).convert("RGB"))
    assert result.shape == (256, 256, 3)
    # The stroke runs along the middle row; the top and bottom quarters are far outside it.
    far = np.r_[0:64, 192:256]
    assert np.array_equal(result[far], original[far])
    assert not np.array_equal(result[118:138, 80:176], original[118:138, 80:176]), "the painted band was edited"
    assert page.problems() == []
