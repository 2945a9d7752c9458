"""The playground page served by the real ingress app (in-process stages, no
Ray) on a free 127.0.0.1 port, and one headless Chromium per module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.routing import Route

from tests.browser.cdp import CHROMIUM, Chromium
from tests.conftest import TEST_SIGNING_KEY
from tests.integration.conftest import free_port

pytestmark = pytest.mark.browser


@dataclass
class Part:
    """One part of a multipart/form-data body."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


def parse_multipart(body: bytes, content_type: str) -> dict[str, list[Part]]:
    """Split a multipart/form-data body exactly as sent (RFC 7578), byte for
    byte: the test checks what the browser put on the wire, so no library
    that might normalise it stands in between."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    fields: dict[str, list[Part]] = {}
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = dict(
            (k.strip(), v.strip().strip('"'))
            for k, _, v in (p.partition("=") for p in headers["content-disposition"].split(";")[1:])
        )
        part = Part(data[:-2] if data.endswith(b"\r\n") else data, disposition.get("filename"), headers.get("content-type"))
        fields.setdefault(disposition["name"], []).append(part)
    return fields


def png_b64(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    fields: dict[str, list[Part]]


@dataclass
class PlaygroundServer:
    url: str
    recorded: list[Recorded] = field(default_factory=list)


def _recording_route(server: PlaygroundServer, path: str, event_prefix: str):
    """Stands in for /v1/images/edits and /v1/images/variations, which are not
    on this branch: records the multipart request and answers as OpenAI does,
    with a stream (a preview, then the image) when asked for one."""

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        fields = parse_multipart(body, request.headers["content-type"])
        server.recorded.append(Recorded(path, dict(request.headers), fields))
        n = int(fields["n"][0].text) if "n" in fields else 1
        image = png_b64((64, 64), (30, 140, 90))
        if "stream" in fields and fields["stream"][0].text == "true":
            def events():
                common = {"b64_json": image, "created_at": int(time.time()), "size": "64x64", "quality": "low",
                          "background": "opaque", "output_format": "png"}
                yield f"event: {event_prefix}.partial_image\ndata: {json.dumps({**common, 'type': f'{event_prefix}.partial_image', 'partial_image_index': 0})}\n\n"
                usage = {"input_tokens": 3, "input_tokens_details": {"text_tokens": 3, "image_tokens": 0},
                         "output_tokens": 16, "total_tokens": 19}
                yield f"event: {event_prefix}.completed\ndata: {json.dumps({**common, 'type': f'{event_prefix}.completed', 'usage': usage})}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": image} for _ in range(n)]})

    return Route(path, endpoint, methods=["POST"])


@pytest.fixture(scope="module")
def playground_server(local_stages):
    """The real ingress app (middleware with the suite's API key, routes,
    playground) around in-process stages, served by uvicorn in a thread."""
    from serve_app.deployments.ingress import ImagesIngress

    config, registry, pipelines, post = local_stages
    with pytest.MonkeyPatch.context() as env:
        env.delenv("IMAGES_API_KEYS", raising=False)
        env.delenv("IMAGES_URL_SIGNING_KEY", raising=False)
        app = ImagesIngress(config, registry, TEST_SIGNING_KEY, pipelines, post).__serve_build_asgi_app__()
    port = free_port()
    server = PlaygroundServer(f"http://127.0.0.1:{port}")
    # First in the route list, so they answer even once the real routes exist.
    app.router.routes[:0] = [
        _recording_route(server, "/v1/images/edits", "image_edit"),
        _recording_route(server, "/v1/images/variations", "image_variation"),
    ]
    with serving(app, port):
        yield server


@contextlib.contextmanager
def serving(app, port: int):
    """An ASGI app served by uvicorn on 127.0.0.1:port in a thread, for the
    length of the block."""
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, name="playground-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def chromium():
    executable = os.environ.get("CHROMIUM", CHROMIUM)
    if not Path(executable).exists():
        pytest.fail(f"{executable} is missing: scripts/install --test installs Debian's chromium (or set CHROMIUM)")
    browser = Chromium(executable)
    yield browser
    browser.close()


@pytest.fixture()
def page(chromium):
    tab = chromium.new_page()
    # A desktop-sized viewport unless a test sets another.
    tab.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    yield tab
    tab.close()
