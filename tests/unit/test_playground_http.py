"""The playground's files over HTTP, in-process: public, under a strict CSP,
and without making any API route public. (The page itself runs in Chromium:
tests/browser/test_playground.py.)"""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serve_app.middleware import is_public
from serve_app.playground import ASSET_TYPES, PAGE_PATHS
from tests.unit.test_ingress_http import assert_error


def csp_directives(header: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in header.split(";") if d.strip()}


@pytest.mark.parametrize("path", PAGE_PATHS)
def test_page_is_public_html_under_a_strict_csp(ingress_client, path):
    resp = ingress_client.get(path, headers={"Authorization": ""})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["x-content-type-options"] == "nosniff"
    csp = csp_directives(resp.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "data:", "blob:"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["form-action"] == ["'none'"]
    html = resp.text
    # Nothing inline for the CSP to block, and nothing from another host.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\sstyle=|\son[a-z]+=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert 'src="/playground/app.js"' in html and 'href="/playground/style.css"' in html


@pytest.mark.parametrize("name", sorted(ASSET_TYPES))
def test_assets_are_public_with_their_type_and_nosniff(ingress_client, name):
    resp = ingress_client.get(f"/playground/{name}", headers={"Authorization": ""})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == ASSET_TYPES[name]
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.content
    # No URL of another host anywhere in the page's code.
    assert not re.search(rb"https?://", resp.content)


def test_unknown_playground_path_is_not_public_and_is_a_404_with_the_key(ingress_client):
    assert_error(ingress_client.get("/playground/secret.txt", headers={"Authorization": ""}), 401, code="invalid_api_key")
    assert_error(ingress_client.get("/playground/secret.txt"), 404, code="not_found")
    assert_error(ingress_client.get("/playground/", headers={"Authorization": ""}), 401, code="invalid_api_key")


def test_no_api_route_became_public(ingress_client):
    """Every API route still needs the key: only the page, its assets and the
    routes that were public before are."""
    app = ingress_client.app
    api_paths = {r.path for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema}
    public = {p for p in api_paths if is_public(p)}
    assert public == {"/health", "/v1/images/files/{name}"}
    for path in ("/v1/models", "/models", "/v1/images/generations"):
        method = ingress_client.post if "generations" in path else ingress_client.get
        kwargs = {"json": {"prompt": "x"}} if "generations" in path else {}
        assert_error(method(path, headers={"Authorization": ""}, **kwargs), 401, code="invalid_api_key")
    assert_error(ingress_client.get("/v1/models/", headers={"Authorization": ""}), 401)


def test_page_under_a_route_prefix_points_at_its_own_assets(ingress_client):
    with TestClient(ingress_client.app, root_path="/images") as client:
        html = client.get("/images/playground").text
    assert 'src="/images/playground/app.js"' in html and 'href="/images/playground/style.css"' in html

