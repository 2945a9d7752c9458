"""The playground page served by the real Ray Serve graph, in headless Chromium:
the page, its assets and its API calls go through Serve's HTTP proxy."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import chromium, page  # noqa: F401 - fixtures
from tests.browser.test_playground import KEY_STORAGE, small_size_model
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

