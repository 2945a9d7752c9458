"""A pure-ASGI guard in front of the routes: request id, body size limit, API key.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that the body limit acts on
the stream as it arrives, chunked bodies included, instead of after the whole
body has been buffered.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import OpenAIError, to_openai_error
from serve_app.playground import PUBLIC_PATHS
from serve_app.security import ApiKeys

# Routes that need no API key: liveness, the API's own description, and
# signed image URLs (the signature is the credential).
# Routes whose bodies carry input images (their ends, so every alias matches).
UPLOAD_ROUTES = ("/images/edits", "/images/variations")

PUBLIC_PREFIXES = ("/health", "/v1/health", "/openapi.json", "/docs", "/v1/images/files/")


def is_public(path: str) -> bool:
    """Whether a path needs no API key: the prefixes above, or exactly one of
    the playground's page and asset paths (the page holds no data; the API
    calls it makes carry the key)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@dataclass
class GuardSettings:
    """Filled in by the ingress replica when it starts."""

    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20  # multipart/form-data bodies (uploaded images)


class BodyTooLarge(OpenAIError):
    def __init__(self, limit: int):
        super().__init__(413, f"Request body too large; the limit is {limit} bytes.", code="request_too_large")


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: GuardSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # Ray's proxy assigns the id and echoes it on the response; without a
        # proxy in front (unit tests) we make one and echo it ourselves.
        request_id = headers.get("x-request-id")
        add_header = request_id is None
        if request_id is None:
            request_id = secrets.token_hex(16)
            scope["headers"] = list(scope.get("headers", [])) + [(b"x-request-id", request_id.encode())]
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if add_header and message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        # Under a route prefix Serve puts the prefix in root_path and leaves it in path.
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        error = self._check(path, headers, scope["state"])
        if error is not None:
            await error.response()(scope, receive, send_with_id)
            return

        limit = self._limit(path, headers)
        received = 0
        answered = False

        async def limited_receive() -> Message:
            # Count the body as it streams in; past the limit, answer 413 at
            # once and tell the app the client went away so it stops reading.
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    answered = True
                    await BodyTooLarge(limit).response()(scope, receive, send_with_id)
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if not answered:
                started = started or message["type"] == "http.response.start"
                await send_with_id(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            # Starlette answers unhandled exceptions outside all middleware;
            # answer here instead so the 500 carries the request id too.
            if started or answered:
                raise
            await to_openai_error(exc, request_id).response()(scope, receive, send_with_id)

    def _limit(self, path: str, headers: dict[str, str]) -> int:
        """Bodies that carry images get their own, larger limit: any multipart
        upload, and any body of the edits and variations routes (the JSON
        edits body carries its images as data URLs)."""
        if path.endswith(UPLOAD_ROUTES) or headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return self.settings.max_upload_bytes
        return self.settings.max_body_bytes

    def _check(self, path: str, headers: dict[str, str], state: dict) -> OpenAIError | None:
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return OpenAIError(400, "Invalid Content-Length header.", code="invalid_content_length")
            if int(length) > self._limit(path, headers):
                return BodyTooLarge(self._limit(path, headers))
        keys = self.settings.api_keys
        # Which key it was (its digest) is what per-key rate limits count under.
        state["api_key_id"] = keys.identify(headers.get("authorization")) if keys.enabled else None
        if not is_public(path) and keys.enabled and state["api_key_id"] is None:
            return OpenAIError(
                401,
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None
