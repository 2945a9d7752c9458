"""serve_app.image_fetch: which image URLs are fetched, and every way one is refused.

The only server contacted is the test's own, on 127.0.0.1. Every other address
in these tests comes from an injected resolver and must be refused before any
connection; the tests that would notice a connection make httpx fail loudly.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from serve_app.config import AppConfig, ImageFetchSettings
from serve_app.errors import OpenAIError
from serve_app.image_fetch import ImageFetcher
from serve_app.image_inputs import read_image


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


PNG = _png()


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping never holds up the test run

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: list[tuple[str, str]] = []  # (path, Host header)
        self.stop = threading.Event()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if body or status == 200:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hits.append((self.path, self.headers.get("Host", "")))
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        try:
            if url.path == "/img.png":
                self._send(200, PNG, Content_Type="image/png")
            elif parts[0] == "redirect":  # /redirect/N: N more redirects (relative ones) before the image
                n = int(parts[1])
                self._send(302, Location=f"/redirect/{n - 1}" if n > 1 else "/img.png")
            elif url.path == "/to":  # a redirect wherever ?url= says
                self._send(302, Location=parse_qs(url.query)["url"][0])
            elif url.path == "/big":
                self._send(200, b"\0" * 5000)
            elif url.path == "/endless":  # no Content-Length: only counting what arrives can stop it
                self.send_response(200)
                self.end_headers()
                for _ in range(1000):
                    if self.server.stop.is_set():
                        break
                    self.wfile.write(b"\0" * 65536)
            elif url.path == "/slow":
                self.server.stop.wait(5)
                self._send(200, PNG)
            elif url.path == "/drip":  # each read is quick, the whole never ends in time
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(50):
                    if self.server.stop.wait(0.1):
                        break
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            elif url.path == "/gzip":
                self._send(200, PNG, Content_Encoding="gzip")
            else:
                self._send(404, b"nope")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetcher hung up, as it should past a limit


@pytest.fixture
def server():
    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def fetcher_for(server: ImageServer, *, networks=("127.0.0.1/32",), hosts=(), resolver=None, **settings):
    allowed = [f"127.0.0.1:{server.server_port}", *hosts]
    return ImageFetcher(
        ImageFetchSettings(allowed_hosts=allowed, allowed_networks=list(networks), **settings), resolver=resolver
    )


def fetch(fetcher: ImageFetcher, url: str, param: str = "image") -> bytes:
    return asyncio.run(fetcher.fetch(url, param))


def refusal(fetcher: ImageFetcher, url: str, param: str = "images[0].image_url") -> dict:
    with pytest.raises(OpenAIError) as info:
        fetch(fetcher, url, param)
    assert info.value.status == 400
    error = info.value.body()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    return error


class RecordingResolver:
    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "not known")
        return self.answers[host]


@pytest.fixture
def no_connections(monkeypatch):
    """Any request httpx would send fails the test."""

    async def send(self, request, **kwargs):
        raise AssertionError(f"a connection was attempted to {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", send)


# Off by default


def test_fetching_is_off_by_default(server):
    assert AppConfig().image_fetch.allowed_hosts == []
    fetcher = ImageFetcher(AppConfig().image_fetch)
    assert not fetcher.enabled
    error = refusal(fetcher, server.origin + "/img.png")
    assert error["code"] == "image_url_fetch_disabled"
    assert "does not fetch image URLs" in error["message"] and "data URL" in error["message"]
    assert server.hits == []


# The allowed case, and the same URL without the network allowance


def test_an_allowed_host_in_an_allowed_network_is_fetched(server):
    fetcher = fetcher_for(server)
    assert fetcher.enabled
    body = fetch(fetcher, server.origin + "/img.png")
    assert body == PNG and read_image(body, "image").width == 8
    assert server.hits == [("/img.png", f"127.0.0.1:{server.server_port}")]


def test_the_same_url_is_refused_when_loopback_is_not_allowed(server):
    error = refusal(fetcher_for(server, networks=()), server.origin + "/img.png")
    assert error["code"] == "image_url_not_allowed" and "loopback" in error["message"]
    assert server.hits == []


def test_a_host_not_listed_is_refused(server):
    # "127.0.0.1" alone allows port 80 only; "*.example.test" not example.test itself.
    fetcher = ImageFetcher(
        ImageFetchSettings(allowed_hosts=["127.0.0.1", "*.example.test"], allowed_networks=["127.0.0.1/32"]),
        resolver=RecordingResolver({}),
    )
    error = refusal(fetcher, server.origin + "/img.png")
    assert error["code"] == "image_url_not_allowed" and f"127.0.0.1:{server.server_port}" in error["message"]
    assert refusal(fetcher, "http://example.test/img.png")["code"] == "image_url_not_allowed"
    assert server.hits == [] and fetcher._resolver.calls == []


def test_the_name_is_resolved_once_and_the_checked_address_is_contacted(server):
    # images.test exists only in this resolver: had httpx resolved the name
    # again itself, the fetch could not have reached the server.
    port = server.server_port
    resolver = RecordingResolver({"images.test": ["127.0.0.1"]})
    fetcher = fetcher_for(server, hosts=[f"IMAGES.test:{port}"], resolver=resolver)
    assert fetch(fetcher, f"http://images.TEST.:{port}/img.png") == PNG
    assert resolver.calls == [("images.test", port)]
    assert server.hits == [("/img.png", f"images.test.:{port}")]  # the host name, not the address


def test_https_sends_the_host_name_as_host_and_sni(monkeypatch):
    # No TLS server here: the request httpx is handed is inspected instead.
    seen = []

    async def send(self, request, **kwargs):
        seen.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(PNG), request=request)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    fetcher = ImageFetcher(
        ImageFetchSettings(allowed_hosts=["*.example.test"], allowed_networks=["127.0.0.1/32"]),
        resolver=RecordingResolver({"cdn.example.test": ["127.0.0.1"]}),
    )
    assert fetch(fetcher, "https://cdn.example.test/a/img.png?v=2") == PNG
    (request,) = seen
    assert str(request.url) == "https://127.0.0.1/a/img.png?v=2"
    assert request.headers["host"] == "cdn.example.test"
    assert request.extensions["sni_hostname"] == "cdn.example.test"


# Addresses refused before any connection


@pytest.mark.parametrize(
    "answer",
    [
        ["10.0.0.1"],
        ["169.254.169.254"],  # cloud metadata
        ["::1"],
        ["::ffff:127.0.0.1"],  # IPv4-mapped loopback
        ["::ffff:169.254.169.254"],
        ["2002:a9fe:a9fe::1"],  # 6to4 around 169.254.169.254
        ["64:ff9b::a00:1"],  # NAT64 around 10.0.0.1
        ["fd00::1"],
        ["fe80::1"],
        ["100.64.0.1"],  # carrier-grade NAT
        ["0.0.0.0"],
        ["224.0.0.1"],
    ],
)
def test_a_name_resolving_to_a_non_public_address_is_refused_before_connecting(answer, no_connections):
    resolver = RecordingResolver({"images.test": answer})
    fetcher = ImageFetcher(ImageFetchSettings(allowed_hosts=["images.test"]), resolver=resolver)
    error = refusal(fetcher, "http://images.test/img.png")
    assert error["code"] == "image_url_not_allowed" and "resolves to a" in error["message"]
    assert resolver.calls == [("images.test", 80)]


def test_one_allowed_address_does_not_excuse_another(no_connections):
    resolver = RecordingResolver({"images.test": ["127.0.0.1", "10.0.0.1"]})
    fetcher = ImageFetcher(
        ImageFetchSettings(allowed_hosts=["images.test"], allowed_networks=["127.0.0.1/32"]), resolver=resolver
    )
    assert "private" in refusal(fetcher, "http://images.test/img.png")["message"]


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/a.png", "http://[::1]/a.png", "http://169.254.169.254/latest/meta-data/"]
)
def test_an_allowed_ip_literal_is_still_checked(url, no_connections):
    fetcher = ImageFetcher(ImageFetchSettings(allowed_hosts=["10.0.0.1", "[::1]", "169.254.169.254"]))
    assert refusal(fetcher, url)["code"] == "image_url_not_allowed"


def test_an_unresolvable_name_is_a_400(no_connections):
    fetcher = ImageFetcher(ImageFetchSettings(allowed_hosts=["nowhere.test"]), resolver=RecordingResolver({}))
    error = refusal(fetcher, "http://nowhere.test/a.png")
    assert error["code"] == "image_url_fetch_failed" and "could not be resolved" in error["message"]
    assert "not known" not in error["message"]  # the resolver's own text stays in the log


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/a.png",
        "file:///etc/passwd",
        "http://user:secret@127.0.0.1/a.png",
        "http:///a.png",
        "http://[::1/",
    ],
)
def test_urls_that_are_not_plain_http_are_refused(url, no_connections):
    fetcher = ImageFetcher(ImageFetchSettings(allowed_hosts=["127.0.0.1"], allowed_networks=["127.0.0.1/32"]))
    assert refusal(fetcher, url)["code"] == "invalid_image_url"


# Redirects


def test_redirects_within_the_limit_are_followed(server):
    assert fetch(fetcher_for(server, max_redirects=3), server.origin + "/redirect/3") == PNG
    assert [path for path, _ in server.hits] == ["/redirect/3", "/redirect/2", "/redirect/1", "/img.png"]


def test_a_redirect_chain_past_max_redirects_is_refused(server):
    error = refusal(fetcher_for(server, max_redirects=3), server.origin + "/redirect/4")
    assert error["code"] == "image_url_too_many_redirects" and "more than 3 times" in error["message"]
    assert len(server.hits) == 4  # the fifth URL was never asked for


def test_a_redirect_to_a_host_not_allowed_is_refused(server):
    resolver = RecordingResolver({})
    fetcher = fetcher_for(server, resolver=resolver)
    error = refusal(fetcher, server.origin + "/to?url=http://elsewhere.test/img.png")
    assert error["code"] == "image_url_not_allowed" and "elsewhere.test:80" in error["message"]
    assert resolver.calls == [] and len(server.hits) == 1


def test_a_redirect_to_an_allowed_name_on_a_private_address_is_refused(server):
    port = server.server_port
    resolver = RecordingResolver({"internal.test": ["10.0.0.1"]})
    fetcher = fetcher_for(server, hosts=[f"internal.test:{port}"], resolver=resolver)
    error = refusal(fetcher, server.origin + f"/to?url=http://internal.test:{port}/img.png")
    assert error["code"] == "image_url_not_allowed" and "private" in error["message"]
    assert resolver.calls == [("internal.test", port)] and len(server.hits) == 1


def test_a_redirect_to_another_scheme_is_refused(server):
    error = refusal(fetcher_for(server), server.origin + "/to?url=file:///etc/passwd")
    assert error["code"] == "invalid_image_url"


# Size, time, status


def test_a_declared_body_over_max_bytes_is_refused(server):
    error = refusal(fetcher_for(server, max_bytes=1000), server.origin + "/big")
    assert error["code"] == "image_too_large" and "1000 bytes" in error["message"]


def test_an_undeclared_body_is_cut_off_past_max_bytes(server):
    started = time.monotonic()
    error = refusal(fetcher_for(server, max_bytes=100_000), server.origin + "/endless")
    assert error["code"] == "image_too_large"
    assert time.monotonic() - started < 3  # not after the server's 64 MiB


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_a_slow_server_is_cut_off_at_timeout_s(server, path):
    started = time.monotonic()
    error = refusal(fetcher_for(server, timeout_s=0.5), server.origin + path)
    took = time.monotonic() - started
    assert error["code"] == "image_url_timeout" and "0.5 seconds" in error["message"]
    assert took < 2.0


def test_an_error_status_is_a_400_saying_what_the_url_answered(server):
    error = refusal(fetcher_for(server), server.origin + "/missing.png")
    assert error["code"] == "image_url_fetch_failed" and "answered HTTP 404" in error["message"]
    assert "nope" not in error["message"]


def test_a_compressed_body_is_refused(server):
    assert refusal(fetcher_for(server), server.origin + "/gzip")["code"] == "image_url_fetch_failed"


def test_a_closed_port_is_a_400():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher = ImageFetcher(ImageFetchSettings(allowed_hosts=[f"127.0.0.1:{port}"], allowed_networks=["127.0.0.1/32"]))
    error = refusal(fetcher, f"http://127.0.0.1:{port}/img.png")
    assert error["code"] == "image_url_fetch_failed" and "could not connect" in error["message"]


# Settings


@pytest.mark.parametrize(
    "entry", ["http://x.test", "x.test/path", "a b", "[::1", "::1", "x.test:0", "x.test:99999", "*x.test"]
)
def test_bad_allowed_hosts_are_refused_at_load(entry):
    with pytest.raises(ValidationError, match="allowed_hosts"):
        ImageFetchSettings(allowed_hosts=[entry])


def test_bad_allowed_networks_are_refused_at_load():
    with pytest.raises(ValidationError, match="allowed_networks"):
        ImageFetchSettings(allowed_networks=["10.0.0.300/8"])


def test_settings_are_normalized_and_part_of_the_app_config():
    config = AppConfig.model_validate(
        {"image_fetch": {"allowed_hosts": [" Images.Example.COM ", "[::1]:8080"], "allowed_networks": ["10.1.2.3/24"]}}
    )
    assert config.image_fetch.allowed_hosts == ["images.example.com", "[::1]:8080"]
    assert config.image_fetch.allowed_networks == ["10.1.2.0/24"]
    fetch_settings = config.image_fetch
    assert (fetch_settings.max_bytes, fetch_settings.timeout_s, fetch_settings.max_redirects) == (50 << 20, 10.0, 3)
