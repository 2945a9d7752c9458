"""The playground: one static page, shipped in the package, that uses this API from a browser.

The page is three files under ``static/`` (no build step, nothing fetched from
another host, since many installs are offline). Loading them needs no API key;
every API call the page makes does, exactly as any other client's.
"""

from __future__ import annotations

import html
from importlib import resources

from fastapi import Request
from fastapi.responses import Response

from serve_app.errors import OpenAIError

# The page answers at both; ``/playground/`` (with the slash) is not one of
# them, so that no relative URL is ever resolved against a path below it.
PAGE_PATHS = ("/", "/playground")
ASSET_PREFIX = "/playground/"
ASSET_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Exact paths, not prefixes: "/" as a prefix would make every API route public.
PUBLIC_PATHS = frozenset((*PAGE_PATHS, *(ASSET_PREFIX + name for name in ASSET_TYPES)))

# Scripts and styles only from this origin, and nothing inline (an injected
# <script> or style attribute does not run). Images may be data: and blob:
# because results arrive as base64 and are shown and downloaded as blobs.
# connect-src 'self' keeps the API key from being sent anywhere else.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with every release: the browser revalidates.
    "Cache-Control": "no-cache",
}
ROOT_PLACEHOLDER = "{{root}}"


class Playground:
    """The page and its assets, read from the package once."""

    def __init__(self) -> None:
        static = resources.files(__package__).joinpath("static")
        self._page = static.joinpath("index.html").read_text("utf-8")
        self._assets = {name: static.joinpath(name).read_bytes() for name in ASSET_TYPES}

    async def page(self, request: Request) -> Response:
        # Under a Serve route prefix the assets live below it; the prefix comes
        # from the deployment's config, and is escaped all the same.
        root = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
        body = self._page.replace(ROOT_PLACEHOLDER, root)
        return Response(
            body,
            media_type="text/html; charset=utf-8",
            headers={**_COMMON_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Frame-Options": "DENY"},
        )

    async def asset(self, name: str) -> Response:
        data = self._assets.get(name)
        if data is None:
            raise OpenAIError(404, "Not found.", code="not_found")
        return Response(data, media_type=ASSET_TYPES[name], headers=_COMMON_HEADERS)
