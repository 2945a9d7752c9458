"""The playground page served by the real Ray Serve graph, in headless Chromium:
the page, its assets and its API calls go through Serve's HTTP proxy."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import chromium, page  # noqa: F401 - fixtures
from tests.browser.test_playground import KEY_STORAGE
from tests.conftest import TEST_API_KEY

pytestmark = [pytest.mark.ray, pytest.mark.browser]


def test_playground_streams_a_generation_then_edits_it_through_the_graph(page, service_url):  # noqa: F811 - fixture
    page.goto(service_url + "/playground")
    page.wait_for("!document.querySelector('#key-panel').hidden")
    page.type_into("#api-key", TEST_API_KEY)
    page.press_enter()
    page.wait_for("document.querySelectorAll('#model option').length > 0", timeout=60)
    assert page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_STORAGE)})") == TEST_API_KEY
    assert "(gpt-image" in page.evaluate("document.querySelector('#model').selectedOptions[0].textContent")
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

    # Edit that result: paint over its middle and send it to the real /v1/images/edits.
    page.click(".result .use-for-edit")
    page.wait_for("!document.querySelector('#mask-stage').hidden && document.querySelector('#mask-canvas').width === 256")
    x, y = page.center_of("#mask-canvas")
    page.mouse("mouseMoved", x - 40, y)
    page.mouse("mousePressed", x - 40, y)
    page.mouse("mouseMoved", x + 40, y, buttons=1)
    page.mouse("mouseReleased", x + 40, y)
    page.type_into("#prompt", " with a boat")
    page.press_enter(ctrl=True)
    # Done when the edit's image is shown, or (failing fast) when an error is.
    page.wait_for(
        "document.querySelectorAll('.result[data-state=final]').length === 2"
        " || !document.querySelector('#form-error').hidden || [...document.querySelectorAll('.field-error')].some((e) => e.textContent)",
        timeout=180,
    )
    assert page.evaluate("document.querySelector('#form-error').textContent") == ""
    assert page.evaluate("document.querySelectorAll('.result[data-state=final]').length") == 2
    edit = [r for r in page.requests() if r["url"].endswith("/v1/images/edits")]
    assert len(edit) == 1 and edit[0]["headers"]["Content-Type"].startswith("multipart/form-data")
    # The edit streamed (image_edit.* events) and its card is the newest, with a seed.
    assert page.evaluate("window.__states").count("partial") >= 2
    assert page.evaluate("document.querySelector('.result .seed').textContent").isdigit()
    assert page.problems() == []
