"""Soak: a bounded run of valid and invalid requests against the service, optionally killing a replica halfway.

    .venv/bin/python scripts/soak.py                                   # 3 minutes, concurrency 8, local graph
    .venv/bin/python scripts/soak.py --duration 30                     # a short run
    .venv/bin/python scripts/soak.py --kill-replica denoiser --replicas 2
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --api-key KEY [--ray-address 127.0.0.1:6379]

Without --url it starts its own local Ray and the application from the
serve config's application args (like scripts/bench.py), on 127.0.0.1 at a
free port, with a temporary data dir and a random API key, so auth is
exercised. With --url it drives a service already running on this machine
(127.0.0.1 / localhost only); replica memory and --kill-replica then need
--ray-address of that service's Ray cluster.

Every request kind has its expected statuses. A generation request may also
be refused (429, or 503 with Retry-After; 504 with x-should-retry: false):
those are counted as refusals, not failures. A request with no answer
(connection error, timeout) is lost; any other 5xx is an unexpected 5xx.
Every error body must be OpenAI's ``{"error": {...}}``; 200 bodies are checked
too (image count, format, size, alpha). The run passes when nothing was lost
and there was no unexpected 5xx.

Prints a table, writes results/soak-<time>.json; the last line printed is
the JSON summary. Exit status 1 when the run did not pass.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import openai
from PIL import Image

from local_graph import APP_NAME, ROOT, logical_cpus_needed, pctl, serve_config_args, start_local_graph, stop_local_graph

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
STAGE_DEPLOYMENT_PREFIX = {"denoiser": "Denoiser-", "vae_decoder": "VaeDecoder-"}
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}
PROMPTS = [
    "A cute baby sea otter floating on its back",
    "a lighthouse at dusk, oil painting",
    "Ein Fuchs im Schnee, Aquarell",
    "猫がピアノを弾いている",
    "isometric pixel art of a tiny village 🏡",
]


# --- records --------------------------------------------------------------------------

@dataclass
class Result:
    kind: str
    t: float  # seconds after the soak (or the warm-up) started
    latency_s: float | None
    status: int | None  # None: no answer
    outcome: str  # ok, refused, lost, unexpected_5xx, unexpected_other, client_error
    detail: str = ""
    envelope_ok: bool | None = None  # None: not an error body
    images: int = 0
    generation: bool = False  # an image generation request (counts for the latency figures)
    warmup: bool = False


def envelope_ok(body: Any) -> bool:
    """OpenAI's error body: {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return False
    e = body["error"]
    return (
        isinstance(e.get("message"), str)
        and isinstance(e.get("type"), str)
        and isinstance(e.get("param", None), (str, type(None)))
        and isinstance(e.get("code", None), (str, type(None)))
    )


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def refusal_ok(status: int, headers: httpx.Headers) -> bool:
    """A documented, well-formed refusal: 429 or 503 with Retry-After, 504 with x-should-retry: false."""
    if status in (429, 503):
        return "retry-after" in headers
    if status == 504:
        return headers.get("x-should-retry") == "false"
    return False


def judge(
    kind: str, t: float, latency: float, status: int, headers: httpx.Headers, body: Any,
    expected: set[int], expect_code: str | None = None, generation: bool = False,
) -> Result:
    """Classify an HTTP answer (the payload of a 200 is checked by the caller)."""
    env = envelope_ok(body) if status >= 400 else None
    code = body["error"].get("code") if env else None
    detail = f"{code}" if code else ""
    if status in expected:
        outcome = "ok"
        if expect_code and status >= 400 and code != expect_code:
            outcome, detail = "unexpected_other", f"code {code!r}, expected {expect_code!r}"
    elif generation and env and refusal_ok(status, headers):
        outcome = "refused"
    elif status >= 500:
        outcome = "unexpected_5xx"
    else:
        outcome = "unexpected_other"
    if status >= 400 and not env:
        text = body if isinstance(body, (dict, list)) else None
        detail = (detail + " " if detail else "") + f"not an OpenAI error body: {json.dumps(text)[:120] if text else '(not JSON)'}"
    return Result(kind, t, latency, status, outcome, detail, env, generation=generation)


# --- the requests ---------------------------------------------------------------------

class Client:
    """What the request kinds share: the official client (right and wrong key),
    a raw httpx client, and the last image URL seen (for the tampering kinds)."""

    def __init__(self, base: str, api_key: str, timeout: float, max_body_bytes: int):
        self.base = base.rstrip("/")
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        # max_retries=0: a retry would hide what the server answered.
        self.openai = openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=timeout)
        self.openai_bad_key = openai.OpenAI(base_url=f"{self.base}/v1", api_key="sk-wrong-" + secrets.token_hex(8), max_retries=0, timeout=timeout)
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self.auth = {"Authorization": f"Bearer {api_key}"}
        self.last_url: str | None = None
        self.lock = threading.Lock()

    def remember_url(self, url: str) -> None:
        with self.lock:
            self.last_url = url

    def close(self) -> None:
        self.http.close()
        self.openai.close()
        self.openai_bad_key.close()


def check_image(data: bytes, fmt: str, size: str | None, alpha: bool) -> str | None:
    """Why these bytes are not the image asked for, or None."""
    if not data.startswith(MAGIC[fmt]) or (fmt == "webp" and data[8:12] != b"WEBP"):
        return f"not a {fmt} file"
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as exc:  # noqa: BLE001
        return f"unreadable {fmt}: {type(exc).__name__}"
    if size and size != "auto" and f"{img.width}x{img.height}" != size:
        return f"size {img.width}x{img.height}, asked {size}"
    if alpha and img.mode not in ("RGBA", "LA"):
        return f"mode {img.mode}, asked for transparency"
    return None


def openai_call(kind: str, t0: float, start: float, call: Callable[[], Any], expected: set[int] = frozenset({200}), expect_code: str | None = None,
                generation: bool = True) -> tuple[Result, Any]:
    """Run one call of the official client; returns its Result and, on success, the raw response."""
    try:
        raw = call()
    except openai.APIStatusError as exc:
        r = exc.response
        return judge(kind, t0 - start, time.perf_counter() - t0, r.status_code, r.headers, json_or_none(r), set(expected), expect_code, generation), None
    except openai.APIConnectionError as exc:  # includes APITimeoutError: no answer
        cause = exc.__cause__ or exc
        return Result(kind, t0 - start, time.perf_counter() - t0, None, "lost", f"{type(exc).__name__}: {type(cause).__name__} {cause}"[:200], generation=generation), None
    return Result(kind, t0 - start, None, 200, "ok", generation=generation), raw


def gen_images(c: Client, start: float, kind: str, params: dict[str, Any]) -> list[Result]:
    """One non-streaming generation through the official client, its payload checked;
    url responses are then fetched (each fetch is its own result)."""
    t0 = time.perf_counter()
    res, raw = openai_call(kind, t0, start, lambda: c.openai.images.with_raw_response.generate(**params))
    if raw is None:
        return [res]
    try:
        resp = raw.parse()
    except Exception as exc:  # noqa: BLE001 - a 200 that the SDK cannot read
        res.latency_s = time.perf_counter() - t0
        res.outcome, res.detail = "unexpected_other", f"unreadable 200 body: {type(exc).__name__}"
        return [res]
    res.latency_s = time.perf_counter() - t0
    res.status = raw.status_code
    n = params.get("n", 1)
    fmt = params.get("output_format", "png")
    size = params.get("size")
    alpha = params.get("background") == "transparent"
    wants_url = params.get("response_format") == "url" or (
        "response_format" not in params and params["model"].startswith("dall-e")
    )
    problems = []
    if len(resp.data) != n:
        problems.append(f"{len(resp.data)} images, asked {n}")
    results = [res]
    for d in resp.data:
        if wants_url:
            if not d.url:
                problems.append("no url")
                continue
            c.remember_url(d.url)
            results.append(fetch_url(c, start, d.url, fmt, size, alpha))
        else:
            if not d.b64_json:
                problems.append("no b64_json")
                continue
            p = check_image(base64.b64decode(d.b64_json), fmt, size, alpha)
            if p:
                problems.append(p)
    res.images = len(resp.data)
    if problems:
        res.outcome, res.detail = "unexpected_other", "bad 200 payload: " + "; ".join(sorted(set(problems)))
    return results


def fetch_url(c: Client, start: float, url: str, fmt: str, size: str | None, alpha: bool) -> Result:
    """GET a returned image URL without the API key (the signature is the credential)."""
    t0 = time.perf_counter()
    try:
        r = c.http.get(url)
    except httpx.TransportError as exc:
        return Result("url_fetch", t0 - start, time.perf_counter() - t0, None, "lost", f"{type(exc).__name__} {exc}"[:200])
    res = judge("url_fetch", t0 - start, time.perf_counter() - t0, r.status_code, r.headers, json_or_none(r) if r.status_code >= 400 else None, {200})
    if r.status_code == 200:
        want_type = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[fmt]
        p = None if r.headers.get("content-type") == want_type else f"content-type {r.headers.get('content-type')}"
        p = p or check_image(r.content, fmt, size, alpha)
        if p:
            res.outcome, res.detail = "unexpected_other", "bad image: " + p
    return res


def k_gen_b64(c, rng, start):
    # Free sizes: the gpt-image-2 generation (gpt-image-1 takes 1024-pixel sizes only); xhigh: 2.5 and 2.6.
    model = rng.choice(["gpt-image-2", "gpt-image-2.5-flare", "embedded-sd"])
    fmt = rng.choice(["png", "jpeg", "webp"])
    size = rng.choices(["256x256", "512x512", "1024x1024", "768x512", "512x768"], [3, 3, 1, 1, 1])[0]
    quality = rng.choices(["low", "medium", "high", "auto", "xhigh"], [2, 2, 1, 1, 1 if model == "gpt-image-2.5-flare" and size != "1024x1024" else 0])[0]
    params: dict[str, Any] = dict(model=model, prompt=rng.choice(PROMPTS), size=size, quality=quality, n=rng.randint(1, 3), output_format=fmt)
    if fmt != "png" and rng.random() < 0.5:
        params["output_compression"] = rng.randint(20, 100)
    if rng.random() < 0.3:
        params["extra_body"] = {"seed": rng.randint(0, 2**31)}
    if rng.random() < 0.3:
        params["user"] = f"soak-user-{rng.randint(1, 5)}"
    # Half the time without response_format: gpt-image's default must be b64_json.
    return gen_images(c, start, "gen_b64", {**params, "response_format": "b64_json"} if rng.random() < 0.5 else params)


def k_gen_url(c, rng, start):
    if rng.random() < 0.5:
        params = dict(model="dall-e-2", prompt=rng.choice(PROMPTS), size=rng.choice(["256x256", "512x512", "1024x1024"]),
                      n=rng.randint(1, 3), response_format="url")
    else:
        params = dict(model="gpt-image-2", prompt=rng.choice(PROMPTS), size=rng.choice(["256x256", "512x512"]),
                      n=rng.randint(1, 3), response_format="url", output_format=rng.choice(["png", "jpeg", "webp"]),
                      quality=rng.choice(["low", "medium"]))
    return gen_images(c, start, "gen_url", params)


def k_gen_dalle3(c, rng, start):
    params = dict(model="dall-e-3", prompt=rng.choice(PROMPTS), size="1024x1024", quality=rng.choice(["standard", "hd"]),
                  style=rng.choice(["vivid", "natural"]), response_format="b64_json")
    return gen_images(c, start, "gen_dalle3", params)


def k_gen_transparent(c, rng, start):
    params = dict(model="gpt-image-2", prompt=rng.choice(PROMPTS), size=rng.choice(["256x256", "512x512"]), quality="low",
                  background="transparent", output_format=rng.choice(["png", "webp"]))
    return gen_images(c, start, "gen_transparent", params)


def k_gen_stream(c, rng, start):
    n, partials = rng.randint(1, 2), rng.randint(0, 3)
    fmt, size = rng.choice(["png", "jpeg", "webp"]), rng.choice(["256x256", "512x512"])
    kind = "gen_stream"
    t0 = time.perf_counter()
    res, stream = openai_call(kind, t0, start, lambda: c.openai.images.generate(
        model="gpt-image-2", prompt=rng.choice(PROMPTS), size=size, n=n, quality=rng.choice(["low", "medium"]),
        output_format=fmt, stream=True, partial_images=partials))
    if stream is None:
        return [res]
    res.status = stream.response.status_code
    counts: Counter = Counter()
    problems = []
    try:
        for event in stream:
            counts[event.type] += 1
            p = check_image(base64.b64decode(event.b64_json), fmt, size, False)
            if p:
                problems.append(p)
    except openai.APIStatusError as exc:  # not expected after a 200, but judged like any status
        r = exc.response
        return [judge(kind, t0 - start, time.perf_counter() - t0, r.status_code, r.headers, json_or_none(r), {200}, generation=True)]
    except openai.APIConnectionError as exc:
        res.latency_s, res.status = time.perf_counter() - t0, None
        res.outcome, res.detail = "lost", f"stream cut: {type(exc.__cause__ or exc).__name__}"
        return [res]
    except openai.APIError as exc:  # an error event in the stream: {"error": {...}} after the 200
        res.latency_s = time.perf_counter() - t0
        body = {"error": exc.body} if isinstance(exc.body, dict) else exc.body
        res.envelope_ok = envelope_ok(body)
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        etype = exc.body.get("type") if isinstance(exc.body, dict) else None
        res.detail = f"in-stream error {code or etype}"
        if code in ("stage_unavailable", "server_overloaded", "storage_unavailable"):
            res.outcome = "refused"  # the in-stream form of a 503 / 429
        elif etype == "server_error":
            res.outcome = "unexpected_5xx"
        else:
            res.outcome = "unexpected_other"
        return [res]
    finally:
        stream.close()
    res.latency_s = time.perf_counter() - t0
    res.images = counts["image_generation.completed"]
    if counts["image_generation.completed"] != n:
        problems.append(f"{counts['image_generation.completed']} completed events, asked {n}")
    if counts["image_generation.partial_image"] > n * partials:
        problems.append(f"{counts['image_generation.partial_image']} partial images, asked at most {n * partials}")
    if problems:
        res.outcome, res.detail = "unexpected_other", "bad stream: " + "; ".join(sorted(set(problems)))
    return [res]


def k_models(c, rng, start):
    t0 = time.perf_counter()
    res, raw = openai_call("models", t0, start, lambda: c.openai.models.with_raw_response.list(), generation=False)
    res.latency_s = time.perf_counter() - t0
    if raw is not None:
        ids = {m.id for m in raw.parse().data}
        if not {"dall-e-2", "dall-e-3", "gpt-image-1"} <= ids:
            res.outcome, res.detail = "unexpected_other", f"models listed: {sorted(ids)}"
    return [res]


def raw_request(c: Client, start: float, kind: str, method: str, path: str, expected: set[int], expect_code: str | None = None,
                generation: bool = False, **kw: Any) -> list[Result]:
    """One request with raw httpx; the answer judged against its expected statuses."""
    t0 = time.perf_counter()
    headers = {**c.auth, **kw.pop("headers", {})}
    try:
        r = c.http.request(method, path if path.startswith("http") else c.base + path, headers=headers, **kw)
    except httpx.TransportError as exc:
        return [Result(kind, t0 - start, time.perf_counter() - t0, None, "lost", f"{type(exc).__name__} {exc}"[:200], generation=generation)]
    body = json_or_none(r) if r.status_code >= 400 else None
    return [judge(kind, t0 - start, time.perf_counter() - t0, r.status_code, r.headers, body, expected, expect_code, generation)]


GEN = "/v1/images/generations"


def k_health(c, rng, start):
    return raw_request(c, start, "health", "GET", "/health", {200}, headers={"Authorization": ""})


def k_bad_json(c, rng, start):
    body = rng.choice([b'{"prompt": "otter",', b'{"prompt": otter}', b"\xff\xfe{", b'[1, 2', b'{"prompt": "x"}}'])
    return raw_request(c, start, "bad_json", "POST", GEN, {400}, generation=True, content=body, headers={"Content-Type": "application/json"})


def k_empty_body(c, rng, start):
    return raw_request(c, start, "empty_body", "POST", GEN, {400}, generation=True, content=b"", headers={"Content-Type": "application/json"})


def k_wrong_type(c, rng, start):
    body = rng.choice([
        {"prompt": "otter", "n": "3"},
        {"prompt": 42},
        {"prompt": ["otter"]},
        {"prompt": "otter", "size": 512},
        {"prompt": "otter", "stream": "yes"},
        {"prompt": "otter", "seed": 1.5},
        {"prompt": "otter", "model": None, "n": True},
        [{"prompt": "otter"}],
        "otter",
    ])
    return raw_request(c, start, "wrong_type", "POST", GEN, {400}, generation=True, json=body)


def k_unknown_enum(c, rng, start):
    body = rng.choice([
        {"prompt": "otter", "quality": "ultra"},
        {"prompt": "otter", "output_format": "bmp"},
        {"prompt": "otter", "response_format": "xml"},
        {"prompt": "otter", "size": "big"},
        {"prompt": "otter", "background": "striped"},
        {"prompt": "otter", "model": "no-such-model"},
        {"prompt": "otter", "model": "dall-e-3", "style": "baroque"},
    ])
    return raw_request(c, start, "unknown_enum", "POST", GEN, {400}, generation=True, json=body)


def k_huge_number(c, rng, start):
    body = rng.choice([
        '{"prompt": "otter", "n": 100000000000000000000000000000000000000}',
        '{"prompt": "otter", "n": 1e308}',
        '{"prompt": "otter", "seed": 1208925819614629174706176}',
        '{"prompt": "otter", "model": "gpt-image-1", "size": "99999x99999"}',
        '{"prompt": "otter", "output_compression": -99999999999}',
        '{"prompt": "otter", "partial_images": 1e400}',
        '{"prompt": "otter", "model": "gpt-image-1", "seed": 9223372036854775807, "n": 2}',
    ])
    return raw_request(c, start, "huge_number", "POST", GEN, {400}, generation=True, content=body.encode(),
                       headers={"Content-Type": "application/json"})


def k_family_rule(c, rng, start):
    body = rng.choice([
        {"prompt": "otter", "model": "dall-e-3", "n": 2},
        {"prompt": "otter", "model": "gpt-image-1", "background": "transparent", "output_format": "jpeg"},
        {"prompt": "otter", "model": "dall-e-2", "size": "1792x1024"},
        {"prompt": "o" * 1001, "model": "dall-e-2"},
        {"prompt": "otter", "model": "gpt-image-1", "output_format": "gif"},
        {"prompt": "otter", "model": "gpt-image-1", "size": "1000x1000"},
    ])
    return raw_request(c, start, "family_rule", "POST", GEN, {400}, generation=True, json=body)


def k_moderation(c, rng, start):
    body = {"prompt": "a gory battlefield, dismembered soldiers", "model": "gpt-image-1"}
    return raw_request(c, start, "moderation", "POST", GEN, {400}, "moderation_blocked", generation=True, json=body)


def k_wrong_content_type(c, rng, start):
    ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"])
    return raw_request(c, start, "wrong_content_type", "POST", GEN, {400, 415}, generation=True,
                       content=b'{"prompt": "otter"}', headers={"Content-Type": ctype})


def k_bad_api_key(c, rng, start):
    if rng.random() < 0.5:  # through the official client, as a misconfigured app would
        t0 = time.perf_counter()
        res, raw = openai_call("bad_api_key", t0, start, lambda: c.openai_bad_key.images.generate(model="dall-e-2", prompt="otter"),
                               expected={401}, expect_code="invalid_api_key", generation=False)
        if raw is not None:
            res.outcome, res.detail, res.latency_s = "unexpected_other", "a wrong key was accepted", time.perf_counter() - t0
        return [res]
    headers = rng.choice([{"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Basic Zm9vOmJhcg=="},
                          {"Authorization": "Bearer " + "x" * 4000}])
    return raw_request(c, start, "bad_api_key", "POST", GEN, {401}, "invalid_api_key", json={"prompt": "otter"}, headers=headers)


def k_oversized(c, rng, start):
    size = c.max_body_bytes + 64 * 1024
    payload = b'{"prompt": "' + b"o" * size + b'"}'
    if rng.random() < 0.5:
        return raw_request(c, start, "oversized_body", "POST", GEN, {413}, "request_too_large", content=payload,
                           headers={"Content-Type": "application/json"})

    def chunks():  # no Content-Length: the limit must act on the stream
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    return raw_request(c, start, "oversized_chunked", "POST", GEN, {413}, "request_too_large", content=chunks(),
                       headers={"Content-Type": "application/json"})


def k_tampered_url(c, rng, start):
    with c.lock:
        url = c.last_url
    if url is None:
        return []
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    path = parts.path
    how = rng.choice(["sig", "expires", "name", "nosig", "traversal"])
    if how == "sig":
        q["sig"] = q.get("sig", "")[:-1] + ("A" if not q.get("sig", "").endswith("A") else "B")
    elif how == "expires":
        q["expires"] = str(int(q.get("expires", "0")) + 1)
    elif how == "name":
        path = path.rsplit("/", 1)[0] + "/" + secrets.token_urlsafe(18) + ".png"
    elif how == "nosig":
        q.pop("sig", None)
    else:
        path = path.rsplit("/", 1)[0] + "/..%2F..%2Fetc%2Fpasswd"
    tampered = urlunsplit((parts.scheme, parts.netloc, path, urlencode(q), ""))
    # A path that leaves the route may also be a 404; a bad signature on the route is a 403.
    expected, code = ({403, 404}, None) if how == "traversal" else ({403}, "invalid_signature")
    return raw_request(c, start, "tampered_url", "GET", tampered, expected, code, headers={"Authorization": ""})


def k_wrong_route(c, rng, start):
    if rng.random() < 0.5:
        return raw_request(c, start, "wrong_route", "GET", GEN, {405})
    return raw_request(c, start, "wrong_route", "POST", "/v1/images/variations-nope", {404}, json={"prompt": "otter"})


VALID = {
    "gen_b64": (k_gen_b64, 4.0),
    "gen_url": (k_gen_url, 3.0),
    "gen_stream": (k_gen_stream, 2.0),
    "gen_transparent": (k_gen_transparent, 1.0),
    "gen_dalle3": (k_gen_dalle3, 1.0),
    "models": (k_models, 1.0),
    "health": (k_health, 0.5),
}
INVALID = {
    "bad_json": (k_bad_json, 0.5),
    "empty_body": (k_empty_body, 0.5),
    "wrong_type": (k_wrong_type, 0.5),
    "unknown_enum": (k_unknown_enum, 0.5),
    "huge_number": (k_huge_number, 0.5),
    "family_rule": (k_family_rule, 0.5),
    "moderation": (k_moderation, 0.3),
    "wrong_content_type": (k_wrong_content_type, 0.5),
    "bad_api_key": (k_bad_api_key, 0.5),
    "oversized": (k_oversized, 0.3),
    "tampered_url": (k_tampered_url, 0.5),
    "wrong_route": (k_wrong_route, 0.3),
}
KINDS = {**VALID, **INVALID}


def run_kind(name: str, c: Client, rng: random.Random, start: float) -> list[Result]:
    t0 = time.perf_counter()
    try:
        return KINDS[name][0](c, rng, start)
    except Exception as exc:  # noqa: BLE001 - a bug in this script, not an answer of the server
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return [Result(name, t0 - start, time.perf_counter() - t0, None, "client_error",
                       f"{type(exc).__name__}: {exc}"[:200] + f" at {Path(where.filename).name}:{where.lineno}")]


# --- replicas: discovery, memory, kill -----------------------------------------------

@dataclass
class Replica:
    actor_id: str
    name: str  # Ray actor name, e.g. SERVE_REPLICA::images#Denoiser-tiny-sd#ab12cd34
    deployment: str
    pid: int
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (t, rss_mb, uss_mb)


def serve_actors() -> dict[str, Replica]:
    """Alive Serve replica actors (and the HTTP proxy) of the app, by actor id, from Ray's GCS actor table.

    ``ray._private.state.actors()`` reads the GCS directly; ``ray.util.state``
    would need the dashboard, which the soak does not start (it costs a core's
    share on a small machine)."""
    try:
        from ray._private import state

        table = [
            {"actor_id": a["ActorID"], "name": a.get("Name", ""), "class_name": a.get("ActorClassName", ""),
             "pid": a.get("Pid"), "state": a.get("State")}
            for a in state.actors().values()
        ]
    except (ImportError, AttributeError):  # the private API moved: fall back to the state API
        from ray.util.state import list_actors

        table = [
            {"actor_id": a.actor_id, "name": a.name, "class_name": a.class_name, "pid": a.pid, "state": a.state}
            for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10000)
        ]
    out = {}
    for a in table:
        if a["state"] != "ALIVE" or not a["pid"]:
            continue
        if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"):
            deployment = a["name"].split("#")[1]
        elif a["class_name"] == "ProxyActor":
            deployment = "(HTTP proxy)"
        else:
            continue
        out[a["actor_id"]] = Replica(a["actor_id"], a["name"], deployment, int(a["pid"]))
    return out


def memory_mb(pid: int) -> tuple[float, float] | None:
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return info.rss / 2**20, getattr(info, "uss", info.rss) / 2**20


def malloc_env(pid: int) -> dict[str, str]:
    """The glibc malloc settings (MALLOC_*) a replica's process was started with:
    the serve config's runtime_env env_vars reach the process only if Ray passed them."""
    import psutil

    try:
        return {k: v for k, v in psutil.Process(pid).environ().items() if k.startswith("MALLOC_")}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def cpu_percent_over(pid: int, seconds: float) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.cpu_percent(None)
        time.sleep(seconds)
        return proc.cpu_percent(None)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return -1.0


def service_log_counts() -> dict[str, int]:
    """What the local service's processes logged about stage failures: the
    ingress's retries (serve_app.deployments.stage_handles) and unhandled
    errors (serve_app.errors), counted in this Ray session's worker logs."""
    import re

    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    if node is None:
        return {}
    pattern = re.compile(r"(\w[\w -]*? call failed \(attempt \d\): \w+)|(unhandled error in request)")
    counts: Counter = Counter()
    for f in Path(node.get_session_dir_path(), "logs").glob("worker-*.err"):
        for line in f.read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m:
                counts[m.group(0)] += 1
    return dict(counts)


def memory_level(samples: list[tuple[float, float, float]], lo: float, hi: float, column: int = 1) -> float:
    """The median of the samples taken between ``lo`` and ``hi`` s (RSS: column 1,
    USS: 2), or of the one nearest that window if none falls in it. A median
    of several samples, because a single 10-s sample can land on one large
    request in flight (a VAE batch of three 1024x1024 images holds hundreds
    of MB for a second) and read as growth."""
    inside = sorted(s[column] for s in samples if lo <= s[0] <= hi)
    if not inside:
        nearest = min(samples, key=lambda s: min(abs(s[0] - lo), abs(s[0] - hi)))
        return nearest[column]
    mid = len(inside) // 2
    return inside[mid] if len(inside) % 2 else (inside[mid - 1] + inside[mid]) / 2


def half_growth(samples: list[tuple[float, float, float]], growth_pct: float, growth_mb: float = 0.0) -> dict[str, Any]:
    """Memory growth of one replica over the first and the second half of its samples.

    The level at the start, the middle and the end is the median of the
    samples in a window of a tenth of the sampled span (at the start: its
    first tenth; the middle: centred on half time; the end: its last tenth).
    The first half holds the warm-up (first calls at each image size, caches,
    the allocator reaching its working set); a leak shows as growth that goes
    on in the second half. ``flagged``: the second half grew by more than
    ``growth_pct`` % of the level at the middle (the replica's size) and by
    more than ``growth_mb`` MB.
    """
    t0, t1 = samples[0][0], samples[-1][0]
    w = (t1 - t0) / 10
    half = (t0 + t1) / 2
    out: dict[str, Any] = {}
    for name, column in (("rss", 1), ("uss", 2)):
        start = memory_level(samples, t0, t0 + w, column)
        mid = memory_level(samples, half - w / 2, half + w / 2, column)
        end = memory_level(samples, t1 - w, t1, column)
        out[f"{name}_first_half_mb"] = round(mid - start, 1)
        out[f"{name}_second_half_mb"] = round(end - mid, 1)
        out[f"{name}_second_half_pct"] = round(100 * (end - mid) / mid, 1) if mid > 0 else None
    second = out["rss_second_half_mb"]
    out["flagged"] = second > growth_mb and out["rss_second_half_pct"] is not None and out["rss_second_half_pct"] > growth_pct
    return out


class ReplicaWatch:
    """Tracks every replica seen, its memory over time, and which one was killed."""

    def __init__(self, start: float):
        self.start = start
        self.replicas: dict[str, Replica] = {}
        self.at_start: set[str] = set()
        self.killed: dict[str, Any] | None = None
        self.recovered_after_s: float | None = None
        self.alive_now: set[str] = set()
        self.lock = threading.Lock()

    def sample(self, mark_start: bool = False) -> None:
        alive = serve_actors()
        t = time.perf_counter() - self.start
        with self.lock:
            for aid, rep in alive.items():
                rep = self.replicas.setdefault(aid, rep)
                m = memory_mb(rep.pid)
                if m:
                    rep.samples.append((t, *m))
            self.alive_now = set(alive)
            if mark_start:
                self.at_start = set(alive)

    def kill(self, stage: str, busy_wait_s: float = 10.0) -> None:
        import ray

        prefix = STAGE_DEPLOYMENT_PREFIX[stage]
        candidates = sorted((r for r in serve_actors().values() if r.deployment.startswith(prefix)), key=lambda r: r.name)
        if not candidates:
            self.killed = {"stage": stage, "error": "no live replica found"}
            return
        # A replica in the middle of a batch (busy on a CPU), so that the kill
        # hits work in flight: wait up to `busy_wait_s` for one, else take the busiest.
        give_up = time.perf_counter() + busy_wait_s
        while True:
            cpu = {r.pid: cpu_percent_over(r.pid, 0.3) for r in candidates}
            if max(cpu.values()) >= 50 or time.perf_counter() > give_up:
                break
        victim = max(candidates, key=lambda r: cpu[r.pid])
        handle = ray.get_actor(victim.name, namespace="serve")
        t = time.perf_counter() - self.start
        ray.kill(handle, no_restart=True)
        self.killed = {"stage": stage, "deployment": victim.deployment, "actor": victim.name, "pid": victim.pid,
                       "at_s": round(t, 1), "live_replicas_before": len(candidates),
                       "cpu_percent_before": {str(pid): round(v) for pid, v in cpu.items()}}

    def wait_recovery(self, deployment: str, replicas: int, until: float) -> None:
        """Poll until the deployment again has its replica count with a new replica, or until `until`."""
        from ray import serve

        from serve_app.deployments.stage_handles import running_replicas

        before = {r.actor_id for r in serve_actors().values() if r.deployment == deployment}
        while time.perf_counter() < until:
            try:
                st = serve.status().applications[APP_NAME].deployments[deployment]
                live = {r.actor_id for r in serve_actors().values() if r.deployment == deployment}
                if str(st.status).split(".")[-1] == "HEALTHY" and running_replicas(st) >= replicas and live - before:
                    self.recovered_after_s = round(time.perf_counter() - self.start - self.killed["at_s"], 1)
                    return
                before &= live  # a replica that died before we looked is not "new"
            except Exception:  # noqa: BLE001 - the controller is busy replacing; ask again
                pass
            time.sleep(1.0)

    def report(self, growth_pct: float, growth_mb: float) -> list[dict[str, Any]]:
        rows = []
        killed_actor = (self.killed or {}).get("actor")
        for rep in sorted(self.replicas.values(), key=lambda r: (r.deployment, r.name)):
            if not rep.samples:
                continue
            start_rss, end_rss = rep.samples[0][1], rep.samples[-1][1]
            half = rep.samples[-1][0] / 2
            mid = min(rep.samples, key=lambda s: abs(s[0] - half))
            alive = rep.actor_id in self.alive_now
            if rep.name and rep.name == killed_actor:
                state = "killed"
            elif not alive:
                state = "gone (replaced)"
            elif rep.actor_id not in self.at_start:
                state = "new (replacement)"
            else:
                state = "alive"
            halves = half_growth(rep.samples, growth_pct, growth_mb)
            # Only a replica that lived through the whole run has two comparable
            # halves; a replacement's first samples are its own warm-up.
            flagged = halves.pop("flagged")
            grew = state == "alive" and len(rep.samples) >= 3 and flagged
            rows.append({
                "deployment": rep.deployment,
                "replica": rep.name.rsplit("#", 1)[-1] if rep.name.startswith("SERVE_REPLICA") else rep.actor_id[:8],
                "pid": rep.pid,
                "state": state,
                "first_sample_s": round(rep.samples[0][0], 1),
                "last_sample_s": round(rep.samples[-1][0], 1),
                "rss_start_mb": round(start_rss, 1),
                "rss_mid_mb": round(mid[1], 1),
                "rss_end_mb": round(end_rss, 1),
                "rss_peak_mb": round(max(s[1] for s in rep.samples), 1),
                "uss_start_mb": round(rep.samples[0][2], 1),
                "uss_end_mb": round(rep.samples[-1][2], 1),
                **halves,
                "growth_flagged": grew,
                "malloc_env": malloc_env(rep.pid) if alive else None,
                "rss_series_mb": [[round(t), round(rss)] for t, rss, _ in rep.samples],
            })
        return rows


# --- the run --------------------------------------------------------------------------

def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        sys.exit(f"--url must be http(s) on 127.0.0.1 or localhost, not {url!r}: the soak only drives a service on this machine")
    return url.rstrip("/").removesuffix("/v1")


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    soak = [r for r in results if not r.warmup]
    outcomes = Counter(r.outcome for r in soak)
    gen_ok = [r.latency_s for r in soak if r.generation and r.status == 200 and r.outcome == "ok" and r.latency_s is not None]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.kind for r in soak}):
        rs = [r for r in soak if r.kind == kind]
        lat = [r.latency_s for r in rs if r.status is not None and r.latency_s is not None]
        by_kind[kind] = {
            "sent": len(rs),
            "by_status": dict(sorted(Counter(str(r.status) for r in rs if r.status is not None).items())),
            "outcomes": dict(Counter(r.outcome for r in rs)),
            "p50_s": round(pctl(lat, 0.5), 3) if lat else None,
            "p99_s": round(pctl(lat, 0.99), 3) if lat else None,
            "max_s": round(max(lat), 3) if lat else None,
        }
    return {
        "sent": len(soak),
        "answered": sum(1 for r in soak if r.status is not None),
        "answered_by_status": dict(sorted(Counter(str(r.status) for r in soak if r.status is not None).items())),
        "outcomes": dict(outcomes),
        "refused": outcomes["refused"],
        "lost": outcomes["lost"],
        "unexpected_5xx": outcomes["unexpected_5xx"],
        "unexpected_other": outcomes["unexpected_other"],
        "client_errors": outcomes["client_error"],
        "envelope_violations": sum(1 for r in soak if r.envelope_ok is False),
        "images_received": sum(r.images for r in soak),
        "generations_ok": len(gen_ok),
        "p50_s": round(pctl(gen_ok, 0.5), 3) if gen_ok else None,
        "p99_s": round(pctl(gen_ok, 0.99), 3) if gen_ok else None,
        "requests_per_s": round(len(soak) / wall, 2),
        "by_kind": by_kind,
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def print_table(summary: dict[str, Any], memory: list[dict[str, Any]], failures: list[Result]) -> None:
    print(f"\n{'kind':<20}{'sent':>6}  {'statuses':<34}{'p50 s':>8}{'p99 s':>8}  outcomes")
    for kind, k in summary["by_kind"].items():
        statuses = " ".join(f"{s}:{n}" for s, n in k["by_status"].items())
        outcomes = " ".join(f"{o}:{n}" for o, n in sorted(k["outcomes"].items()))
        p50 = f"{k['p50_s']:.3f}" if k["p50_s"] is not None else "-"
        p99 = f"{k['p99_s']:.3f}" if k["p99_s"] is not None else "-"
        print(f"{kind:<20}{k['sent']:>6}  {statuses:<34}{p50:>8}{p99:>8}  {outcomes}")
    print(f"\nsent {summary['sent']}  answered {summary['answered']}  by status {summary['answered_by_status']}")
    print(f"lost {summary['lost']}  unexpected 5xx {summary['unexpected_5xx']}  unexpected other {summary['unexpected_other']}  "
          f"refused {summary['refused']}  envelope violations {summary['envelope_violations']}  client errors {summary['client_errors']}")
    print(f"image generations answered 200: {summary['generations_ok']} ({summary['images_received']} images)  "
          f"latency p50 {summary['p50_s']} s  p99 {summary['p99_s']} s")
    if memory:
        print(f"\n{'deployment':<22}{'replica':<10}{'pid':>8}  {'state':<19}{'RSS start':>10}{'mid':>7}{'end':>7}{'peak':>7}"
              f"{'USS start':>11}{'end':>7}{'1st half':>10}{'2nd half':>10}{'2nd %':>7}  growth")
        for m in memory:
            print(f"{m['deployment']:<22}{m['replica']:<10}{m['pid']:>8}  {m['state']:<19}{m['rss_start_mb']:>10.0f}{m['rss_mid_mb']:>7.0f}"
                  f"{m['rss_end_mb']:>7.0f}"
                  f"{m['rss_peak_mb']:>7.0f}{m['uss_start_mb']:>11.0f}{m['uss_end_mb']:>7.0f}"
                  f"{m['rss_first_half_mb']:>+10.0f}{m['rss_second_half_mb']:>+10.0f}{pct(m['rss_second_half_pct']):>7}"
                  f"  {'FLAGGED' if m['growth_flagged'] else '-'}")
        print("growth: RSS over the first and the second half (medians of the samples in a tenth of the run at the start, "
              "middle and end); FLAGGED: a replica alive throughout whose second half grew more than the threshold")
    if failures:
        print(f"\nfirst {min(len(failures), 20)} of {len(failures)} lost / unexpected / client errors:")
        for r in failures[:20]:
            print(f"  t={r.t:7.1f}s  {r.kind:<18} {str(r.status):>4} {r.outcome:<16} {r.detail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads, each with one request in flight (default 8)")
    ap.add_argument("--kill-replica", choices=["denoiser", "vae_decoder", "none"], default="none",
                    help="ray.kill one replica of this stage at half time (default none)")
    ap.add_argument("--replicas", type=int, default=None,
                    help="num_replicas of the --kill-replica stage (local graph only); 2 lets the stage survive the kill")
    ap.add_argument("--ingress-limit", type=int, default=None,
                    help="local graph: max_concurrent_requests of the ingress; below --concurrency it exercises the 429 path")
    ap.add_argument("--serve-config", default=str(ROOT / "serve_config.yaml"), help="serve config whose application args the local graph uses")
    ap.add_argument("--url", default=None, help="drive a service already running on 127.0.0.1/localhost instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("IMAGES_API_KEY"), help="API key for --url (default env IMAGES_API_KEY)")
    ap.add_argument("--ray-address", default=None, help="with --url: the service's Ray cluster, for replica memory and --kill-replica")
    ap.add_argument("--max-body-bytes", type=int, default=None, help="with --url: the service's max_body_bytes (default 1 MiB)")
    ap.add_argument("--timeout", type=float, default=None, help="client timeout per request, s (default: the server's deadline + 120)")
    ap.add_argument("--growth-pct", type=float, default=5.0,
                    help="flag a replica whose RSS grew in the run's second half by more than this many percent of its size (default 5)")
    ap.add_argument("--growth-mb", type=float, default=0.0, help="... and by more than this many MB (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of the request kinds: {', '.join(KINDS)}")
    ap.add_argument("--out", default=str(ROOT / "results"), help="folder for the JSON summary")
    a = ap.parse_args()
    unknown = set((a.kinds or "").split(",")) - set(KINDS) - {""}
    if unknown:
        sys.exit(f"unknown --kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    if a.replicas is not None and (a.kill_replica == "none" or a.url):
        sys.exit("--replicas sets the --kill-replica stage's num_replicas in the local graph; name that stage, and no --url")
    if a.url and a.ingress_limit is not None:
        sys.exit("--ingress-limit configures the local graph; it cannot change a running service")
    if a.url and a.kill_replica != "none" and not a.ray_address:
        sys.exit("--kill-replica with --url needs --ray-address of the service's Ray cluster")

    import ray

    tmp: Path | None = None
    started_wall = time.perf_counter()
    if a.url:
        base = check_url(a.url)
        api_key = a.api_key or ""
        max_body = a.max_body_bytes or (1 << 20)
        deadline_s = 300.0
        if a.ray_address:
            try:
                ray.init(address=a.ray_address, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                sys.exit(f"cannot join the Ray cluster at {a.ray_address} ({exc}); a cluster with token "
                         "authentication also needs its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    else:
        args = serve_config_args(Path(a.serve_config))
        tmp = Path(tempfile.mkdtemp(prefix="soak-"))
        api_key = "sk-soak-" + secrets.token_hex(16)
        (tmp / "api_keys").write_text(api_key + "\n")
        args.update(data_dir=str(tmp / "data"), api_keys_file=str(tmp / "api_keys"))
        if a.ingress_limit is not None:
            args["max_concurrent_requests"] = a.ingress_limit
        if a.replicas is not None:
            args.setdefault("stages", {}).setdefault(a.kill_replica, {})["num_replicas"] = a.replicas
        from serve_app.config import AppConfig

        app_cfg = AppConfig.model_validate(args)
        max_body, deadline_s = app_cfg.max_body_bytes, app_cfg.request_deadline_s
        cpus = logical_cpus_needed(args)
        print(f"starting the graph: {a.serve_config} args, data dir {tmp}, Ray logical CPUs {cpus} (cores {os.cpu_count()})", flush=True)
        base = start_local_graph(args, num_cpus=cpus)
    timeout = a.timeout or deadline_s + 120
    has_ray = ray.is_initialized()
    client = Client(base, api_key, timeout, max_body)
    print(f"target {base}  duration {a.duration:g} s  concurrency {a.concurrency}  kill {a.kill_replica}  client timeout {timeout:g} s", flush=True)

    # Warm-up: each kind once, in order, so first-call allocations are in the
    # memory baseline and an image URL exists for the tampering kinds.
    results: list[Result] = []
    warm_start = time.perf_counter()
    rng0 = random.Random(a.seed)
    for name in ["gen_url", *KINDS]:
        for r in run_kind(name, client, rng0, warm_start):
            r.warmup = True
            results.append(r)
    warm_bad = [r for r in results if r.outcome not in ("ok", "refused")]
    print(f"warm-up: {len(results)} requests, {len(warm_bad)} not ok", flush=True)
    for r in warm_bad:
        print(f"  warm-up {r.kind} {r.status} {r.outcome} {r.detail}", flush=True)

    start = time.perf_counter()
    watch = ReplicaWatch(start) if has_ray else None
    if watch:
        watch.sample(mark_start=True)
    stop_at = start + a.duration
    lock = threading.Lock()
    names = [k for k in KINDS if a.kinds is None or k in a.kinds.split(",")]
    weights = [KINDS[k][1] for k in names]

    in_flight = [0]

    def worker(i: int) -> None:
        rng = random.Random(a.seed * 1000 + i + 1)
        while time.perf_counter() < stop_at:
            kind = rng.choices(names, weights)[0]
            with lock:
                in_flight[0] += 1
            out = run_kind(kind, client, rng, start)
            with lock:
                in_flight[0] -= 1
                results.extend(out)

    def sampler() -> None:
        while time.perf_counter() < stop_at:
            time.sleep(10)
            watch.sample()

    def killer() -> None:
        time.sleep(max(0.0, start + a.duration / 2 - time.perf_counter()))
        watch.kill(a.kill_replica)
        watch.killed["client_requests_in_flight"] = in_flight[0]
        print(f"killed: {watch.killed}", flush=True)
        if "deployment" in watch.killed:
            replicas = a.replicas or watch.killed["live_replicas_before"]
            watch.wait_recovery(watch.killed["deployment"], replicas, stop_at + 120)
            print(f"{watch.killed['deployment']} back to {replicas} replicas after {watch.recovered_after_s} s", flush=True)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.concurrency)]
    if watch:
        threads.append(threading.Thread(target=sampler, daemon=True))
        if a.kill_replica != "none":
            threads.append(threading.Thread(target=killer, daemon=True))
    for th in threads:
        th.start()
    last_print = start
    while any(th.is_alive() for th in threads[: a.concurrency]):
        time.sleep(0.5)
        if time.perf_counter() - last_print >= 15:
            last_print = time.perf_counter()
            with lock:
                c = Counter(r.outcome for r in results if not r.warmup)
            print(f"  t={last_print - start:5.0f}s  sent {sum(c.values())}  {dict(c)}", flush=True)
    for th in threads:
        th.join(timeout=150)
    wall = time.perf_counter() - start
    memory: list[dict[str, Any]] = []
    if watch:
        watch.sample()
        memory = watch.report(a.growth_pct, a.growth_mb)
    client.close()

    summary = summarize(results, wall)
    log_counts = service_log_counts() if not a.url else None
    if log_counts:
        print(f"service logs: {log_counts}")
    failures = sorted((r for r in results if not r.warmup and r.outcome not in ("ok", "refused")), key=lambda r: r.t)
    print_table(summary, memory, failures)
    passed = summary["lost"] == 0 and summary["unexpected_5xx"] == 0
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": bool(shutil.which("nvidia-smi"))},
        "target": a.url or "local graph",
        "serve_config": None if a.url else a.serve_config,
        "duration_s": a.duration,
        "concurrency": a.concurrency,
        "wall_s": round(wall, 1),
        "warmup_requests": sum(1 for r in results if r.warmup),
        "warmup_not_ok": [asdict(r) for r in warm_bad],
        **summary,
        "killed_replica": watch.killed if watch else None,
        "recovered_after_s": watch.recovered_after_s if watch else None,
        "service_log_counts": log_counts,
        "replicas": memory,
        "memory_growth_flagged": [f"{m['deployment']}#{m['replica']}" for m in memory if m["growth_flagged"]],
        "failures": [asdict(r) for r in failures[:50]],
        "pass": passed,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{'PASS' if passed else 'FAIL'}: lost {summary['lost']}, unexpected 5xx {summary['unexpected_5xx']}; wrote {path}"
          f" (total {time.perf_counter() - started_wall:.0f} s)", flush=True)
    if not a.url:
        stop_local_graph()
        shutil.rmtree(tmp, ignore_errors=True)
    elif has_ray:
        ray.shutdown()
    compact = {k: v for k, v in report.items() if k not in ("by_kind", "failures", "warmup_not_ok", "replicas")}
    compact["replicas"] = [{k: v for k, v in m.items() if k != "rss_series_mb"} for m in memory]
    print(json.dumps(compact, separators=(",", ":")), flush=True)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
