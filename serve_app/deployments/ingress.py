"""ImagesIngress deployment: the HTTP face of the service.

Routes are thin: FastAPI validates the body against the protocol models,
:func:`resolve_request` applies the model's rules, :func:`generate` runs the
stages, and the route returns the result. Every error goes through the one
mapper in ``serve_app.errors``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from serve_app.codecs import CONTENT_TYPES
from serve_app.config import AppConfig, ModelRegistry
from serve_app.config import resolve_path
from serve_app.errors import (
    OpenAIError,
    deadline_exceeded,
    install_error_handlers,
    invalid_request,
    model_not_ready,
    model_unavailable,
    rate_limit_exceeded,
    request_id_of,
    server_overloaded,
    to_openai_error,
)
from serve_app.deployments.stage_handles import HandleStages
from serve_app.edit_bodies import as_edit_request, read_edit, read_variation, reference_bytes
from serve_app.edits import EditSource
from serve_app.image_fetch import ImageFetcher
from serve_app.forwarding import Forwarding
from serve_app.generation import (
    ResolvedRequest,
    generate,
    generate_stream,
    resolve_request,
    free_size_limit,
    served_qualities,
    served_sizes,
)
from serve_app.metrics import IMAGES
from serve_app.moderation import AllowAll, Moderator, PatternModerator, moderation_blocked
from serve_app.middleware import GuardSettings, RequestGuard, is_public
from serve_app.playground import ASSET_PREFIX, PAGE_PATHS, Playground
from serve_app.protocol import (
    STREAM_EVENTS,
    ErrorResponse,
    Health,
    EDIT_STREAM_EVENTS,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    _ImageRequest,
    Model,
    ModelList,
)
from serve_app.security import API_KEYS_ENV, ApiKeys, UrlSigner, hash_for_log
from serve_app.storage import ImageStore, local_store_warning

logger = logging.getLogger("serve_app")
_RESPONSE_JSON = TypeAdapter(ImagesResponse)

# What each error status means here; every one has the OpenAI error body.
_ERRORS: dict[int, str] = {
    400: "Invalid request; `error.param` names the parameter, where there is one.",
    415: "The body's Content-Type is not one this route reads.",
    401: "Missing or wrong API key.",
    403: "Invalid or expired image URL signature.",
    404: "No such image.",
    413: "Request body over the server's size limit.",
    429: "Over capacity (server_overloaded) or over this key's rate limit (rate_limit_exceeded); retry after `Retry-After` seconds.",
    500: "Internal error; the message gives the request id.",
    503: "Model loading or unavailable, a stage down, or the image store unavailable; most carry `Retry-After`.",
    504: "Not finished within the server's deadline.",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


# `stream: true` answers 200 with server-sent events: each event's `data` is
# the JSON of the model its name says (OpenAPI before 3.2 has the schema of an
# event-stream describe one event, as {event, data}).
def _event_stream_schema(events: dict[str, type]) -> dict[str, Any]:
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"},
                    },
                },
            }
            for name, model in events.items()
        ]
    }


_EVENT_STREAM_SCHEMA = _event_stream_schema(STREAM_EVENTS)


def _form_schema(model: type, skip: tuple[str, ...], with_mask: bool) -> dict[str, Any]:
    """The multipart form of an edits or variations body: the model's fields
    as text (the SDKs send every value as a string) and the image files."""
    fields = {
        name: {"type": "string", "description": f.description or ""}
        for name, f in model.model_fields.items()
        if name not in skip
    }
    binary = {"type": "string", "format": "binary"}
    fields["image"] = {**binary, "description": "The image to edit (one file)."}
    fields["image[]"] = {"type": "array", "items": binary, "description": "Several images (the first is edited)."}
    if with_mask:
        fields["mask"] = {**binary, "description": "PNG the size of the image; alpha 0 marks where to edit."}
    required = ["prompt"] if "prompt" in fields else []
    return {"type": "object", "properties": fields, "required": required}

# At most this much of the x-ignored-parameters header: a client can send thousands of unknown fields.
MAX_IGNORED_HEADER_CHARS = 1024

# How long the ingress trusts its stages' answer to "can you serve?".
HEALTH_TTL_S = 30.0
# How long it trusts that every stage of a pipeline has a running replica.
RUNNING_TTL_S = 5.0
# How long a request waits for the RateLimiter before it is admitted unlimited.
RATE_LIMITER_WAIT_S = 5.0


def _alive_ray_nodes() -> int:
    """Alive nodes of the Ray cluster this replica runs in; 1 outside Ray (in-process tests)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))


class ImagesIngress:
    """Holds the ingress's state; :func:`build_api` gives it its HTTP routes.

    Ray calls ``__serve_build_asgi_app__`` on each replica after ``__init__``,
    so every replica builds its own FastAPI app around its own instance (no
    module-level app whose copies drift apart between processes), and tests
    build the very same app around an in-process instance.
    """

    def __init__(
        self,
        config: AppConfig,
        registry: ModelRegistry,
        signing_key: str,
        pipelines: dict[str, dict[str, Any]],
        post_processor: Any,
        sweeper: Any = None,
        rate_limiter: Any = None,
    ):
        self.config = config
        self.registry = registry
        self.signer = UrlSigner(signing_key, config.url_ttl_s)
        self.forwarding = Forwarding(config.trusted_proxies)
        self.store = ImageStore.from_config(config)
        # Checked once, at start: nodes that join later are not counted.
        shared_store_problem = local_store_warning(self.store, _alive_ray_nodes())
        if shared_store_problem:
            logger.warning(shared_store_problem)
        self.stages = {
            name: HandleStages(name, h["text_encoder"], h["denoiser"], h["vae_decoder"], post_processor)
            for name, h in pipelines.items()
        }
        # Held only so that Serve deploys the sweeper with this graph; never called.
        self.sweeper = sweeper
        # The RateLimiter deployment's handle when rate_limits are set (one window per key for all replicas).
        self.rate_limiter = rate_limiter
        self._health: dict[str, tuple[float, str | None]] = {}
        self._running_since: dict[str, float] = {}
        self._asking_starting: dict[str, asyncio.Future] = {}
        self.created = int(time.time())
        self.in_flight = 0  # generations (streams included) being worked on
        self.moderator: Moderator = (
            PatternModerator.from_file(resolve_path(registry.moderation)) if registry.moderation else AllowAll()
        )
        self.fetcher = ImageFetcher(config.image_fetch)
        self.api_keys = ApiKeys.from_sources(os.environ.get(API_KEYS_ENV), config.api_keys_file)
        if not self.api_keys.enabled:
            logger.warning("No API key configured (%s or api_keys_file): the API is open to anyone who can reach it.", API_KEYS_ENV)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    def _image_url(self, request: Request, name: str) -> str:
        direct = self.store.url_for(name, self.config.url_ttl_s)
        if direct:
            return direct
        base = (self.config.public_base_url or self.forwarding.base_url(request)).rstrip("/")
        expires, sig = self.signer.sign(name)
        return f"{base}/v1/images/files/{name}?expires={expires}&sig={sig}"

    async def stages_starting(self, pipeline: str) -> list[str]:
        """The pipeline's deployments without a running replica; trusted for RUNNING_TTL_S once all run."""
        seen = self._running_since.get(pipeline)
        if seen is not None and time.monotonic() - seen < RUNNING_TTL_S:
            return []
        # Requests that arrive together share one question to the controller.
        asking = self._asking_starting.get(pipeline)
        if asking is None or asking.done():
            asking = self._asking_starting[pipeline] = asyncio.ensure_future(self.stages[pipeline].stages_starting())
        try:
            starting = await asyncio.shield(asking)
        except Exception as exc:  # noqa: BLE001 - the controller is unreachable: do not refuse work for it
            logger.warning("could not ask Serve whether pipeline %s is running: %s", pipeline, exc)
            return []
        if not starting:
            self._running_since[pipeline] = time.monotonic()
        return starting

    async def pipeline_problem(self, pipeline: str) -> str | None:
        """Why a pipeline cannot serve, or None; its stages are asked at most every HEALTH_TTL_S."""
        checked = self._health.get(pipeline)
        if checked is not None and time.monotonic() - checked[0] < HEALTH_TTL_S:
            return checked[1]
        try:
            problem = await self.stages[pipeline].problem()
        except Exception as exc:  # noqa: BLE001 - Serve restarts unreachable replicas; ask again next time
            logger.warning("could not ask pipeline %s whether it can serve: %s", pipeline, exc)
            return None
        if problem and (checked is None or checked[1] != problem):
            logger.error("pipeline %s cannot serve and its models are hidden: %s", pipeline, problem)
        self._health[pipeline] = (time.monotonic(), problem)
        return problem

    async def fetch_image(self, url: str, param: str) -> bytes:
        """An http(s) image URL's bytes, where config allows fetching it (off by default)."""
        return await self.fetcher.fetch(url, param)

    async def create_image(self, body: ImageGenerationRequest, request: Request) -> Response:
        source = None
        if body.image is not None:
            # `image` on generations makes the request an edit of those images.
            refs = [("image", body.image)] if isinstance(body.image, str) else [(f"image[{i}]", v) for i, v in enumerate(body.image)]
            source = EditSource("edit", [(p, await reference_bytes(v, p, self.fetch_image)) for p, v in refs])
        return await self._serve(body, source, request)

    async def create_edit(self, request: Request) -> Response:
        body, source = await read_edit(request, self.fetch_image)
        return await self._serve(body, source, request, events="image_edit")

    async def create_variation(self, request: Request) -> Response:
        body, source = await read_variation(request, self.fetch_image)
        return await self._serve(as_edit_request(body), source, request, extra_ignored=body.unknown_fields())

    async def _serve(
        self,
        body: _ImageRequest,
        source: EditSource | None,
        request: Request,
        events: str = "image_generation",
        extra_ignored: list[str] = (),
    ) -> Response:
        # The model's rules first: a bad request is a 400 even under overload.
        r = resolve_request(body, self.registry, source, self.config.max_input_pixels)
        r.events = events
        r.ignored = sorted(set(r.ignored) | set(extra_ignored))
        # Admission: refuse at once past the configured concurrency, so that
        # overload is a fast, readable 429 rather than an ever longer queue.
        if self.in_flight >= self.config.max_concurrent_requests:
            raise server_overloaded("this ingress replica")
        slot = _Slot(self)
        try:
            response = await self._create_image(r, request, slot)
        except BaseException:
            slot.release()
            raise
        if isinstance(response, StreamingResponse):
            # The stream holds the slot until it ends. A stream that never
            # starts (its client left at once) releases it when collected.
            weakref.finalize(response.body_iterator, slot.release)
        else:
            slot.release()
        return response

    async def _create_image(self, r: ResolvedRequest, request: Request, slot: "_Slot") -> Response:
        request_id = request_id_of(request)
        if await self.stages_starting(r.model.pipeline):
            raise model_not_ready(r.model.id)
        if await self.pipeline_problem(r.model.pipeline):
            raise model_unavailable(r.model.id)
        headers = await self._admit_for_rate_limits(request, r.n)
        logger.info(
            "request %s: %s model=%s n=%d size=%s quality=%s stream=%s prompt_chars=%d user=%s",
            request_id,
            r.edit.kind if r.edit is not None else "generation",
            r.model.id,
            r.n,
            r.size,
            r.quality,
            r.stream,
            len(r.user_prompt),
            hash_for_log(r.end_user) if r.end_user else "-",
        )
        # Moderation runs before any model work.
        blocked = self.moderator.check(r.user_prompt, r.moderation)
        if blocked is not None:
            logger.info("request %s: prompt blocked by moderation (%s)", request_id, blocked)
            raise moderation_blocked(blocked)
        ignored = _ignored_header(r.ignored)
        if ignored:
            headers["x-ignored-parameters"] = ignored
        stages = self.stages[r.model.pipeline]
        if r.stream:
            return StreamingResponse(self._sse(r, stages, request_id, slot), media_type="text/event-stream", headers=headers)
        try:
            result = await asyncio.wait_for(
                generate(r, stages, lambda name: self._image_url(request, name)), self.config.request_deadline_s
            )
        except asyncio.TimeoutError:
            # wait_for cancelled the stage calls; Serve passes the cancellation on to the replicas.
            raise deadline_exceeded(self.config.request_deadline_s) from None
        IMAGES.inc(r.n, tags={"model": r.model.id, "output_format": r.output_format})
        # Serialized by pydantic-core straight to bytes: the same JSON as
        # JSONResponse(model_dump()), 3x faster on a 1 MB base64 image.
        return Response(_RESPONSE_JSON.dump_json(result, exclude_none=True), media_type="application/json", headers=headers)

    async def _admit_for_rate_limits(self, request: Request, images: int) -> dict[str, str]:
        """Count the request and its images against its key's minute, or refuse it
        with 429 rate_limit_exceeded; returns the x-ratelimit-* headers."""
        if self.rate_limiter is None:
            return {}
        limits = self.config.rate_limits
        if limits.images_per_minute is not None and images > limits.images_per_minute:
            raise invalid_request(
                f"n={images} is more than the {limits.images_per_minute} images per minute this key may ask for.", "n"
            )
        # With no API keys configured, clients are told apart by address.
        identity = getattr(request.state, "api_key_id", None) or f"addr:{request.client.host if request.client else '-'}"
        try:
            decision = await asyncio.wait_for(self.rate_limiter.acquire.remote(identity, images), RATE_LIMITER_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - a lost or stuck limiter must not turn every request into an error
            logger.warning("rate limiter unavailable, request admitted unlimited: %s", type(exc).__name__)
            return {}
        if not decision.allowed:
            raise rate_limit_exceeded(decision.retry_after_s, decision.headers())
        return decision.headers()

    async def _sse(self, r, stages, request_id: str, slot: "_Slot") -> AsyncIterator[str]:
        """Server-sent events; an error after the stream started, the deadline
        included, is sent as an error event."""
        deadline = time.monotonic() + self.config.request_deadline_s
        events = generate_stream(r, stages)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    # wait_for cancelled the stage call; the denoiser stops at its next step.
                    raise deadline_exceeded(self.config.request_deadline_s) from None
                if event.type == "image_generation.completed":
                    IMAGES.inc(1, tags={"model": r.model.id, "output_format": r.output_format})
                yield f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"
        except Exception as exc:  # noqa: BLE001 - the client must hear about it in-stream
            yield f"event: error\ndata: {json.dumps(to_openai_error(exc, request_id).body())}\n\n"
        finally:
            slot.release()
            await events.aclose()

    async def _problem_unless_starting(self, pipeline: str) -> str | None:
        # Stages still starting cannot be asked (the call would wait for them); their models stay listed.
        return None if await self.stages_starting(pipeline) else await self.pipeline_problem(pipeline)

    async def list_models(self) -> ModelList:
        names = list(self.registry.pipelines)
        problems = dict(zip(names, await asyncio.gather(*(self._problem_unless_starting(n) for n in names))))
        data = []
        for m in self.registry.models:
            if problems[m.pipeline]:
                continue
            p = self.registry.pipelines[m.pipeline]
            data.append(
                Model(
                    id=m.id,
                    created=self.created,
                    owned_by=m.owned_by,
                    family=m.family,
                    sizes=served_sizes(m, p),
                    qualities=served_qualities(m, p),
                    default_steps=p.default_steps,
                    max_pixels=free_size_limit(m, p),
                )
            )
        return ModelList(data=data)

    async def health(self) -> Response:
        """200 once every pipeline's stages have a running replica; 503
        model_not_ready (with Retry-After) while some are starting, so that a
        load balancer sends no traffic to a service that would refuse it."""
        starting = [p for p in self.registry.pipelines if await self.stages_starting(p)]
        if starting:
            models = [m.id for m in self.registry.models if m.pipeline in starting]
            return model_not_ready(", ".join(models)).response()
        return JSONResponse({"status": "ok"})

    async def get_image(
        self, request: Request, name: str, expires: str | None = Query(None), sig: str | None = Query(None)
    ) -> Response:
        # A missing or malformed signature is a bad signature (403), not a bad request.
        problem = "bad_signature"
        if expires and expires.isdigit() and sig:
            problem = self.signer.verify(name, int(expires), sig)
        if problem == "expired":
            raise OpenAIError(403, "This image URL has expired.", code="url_expired")
        if problem:
            raise OpenAIError(403, "Invalid image URL signature.", code="invalid_signature")
        data = self.store.get(name)
        if data is None:
            raise OpenAIError(404, "No such image.", code="not_found")
        ext = name.rsplit(".", 1)[1]
        headers = {"Cache-Control": "private, max-age=3600", "Content-Length": str(len(data))}
        if ext == "svg":
            # An SVG opened from this origin is a document: it may not run
            # scripts or load anything (ours are traced paths only).
            headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
            headers["X-Content-Type-Options"] = "nosniff"
        # HEAD: the same status and headers as GET, without the body.
        body = b"" if request.method == "HEAD" else data
        return Response(body, media_type=CONTENT_TYPES[ext], headers=headers)


def _ignored_header(names: list[str]) -> str:
    """The x-ignored-parameters value. Unknown field names are the client's
    own text, so every name is percent-encoded as in a URL (a name outside
    Latin-1 could not be sent in a header at all, and failed the request)."""
    kept: list[str] = []
    size = 0
    for name in names:
        quoted = quote(name, safe="")
        size += len(quoted) + 1
        if size > MAX_IGNORED_HEADER_CHARS + 1:
            break
        kept.append(quoted)
    return ",".join(kept)


class _Slot:
    """One admitted generation's place in the ingress's concurrency limit; released once."""

    def __init__(self, ingress: ImagesIngress):
        self._ingress = ingress
        self._held = True
        ingress.in_flight += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._ingress.in_flight -= 1


def build_api(ingress: ImagesIngress) -> FastAPI:
    """The routes, middleware and error handlers around one ingress instance."""
    api = FastAPI(
        title="Self-hosted OpenAI-compatible Images API",
        version="0.1.0",
        description="OpenAI Images API on a Ray Serve graph of text encoder, denoiser, VAE decoder and post-processor.",
    )
    install_error_handlers(api)
    api.add_middleware(
        RequestGuard,
        settings=GuardSettings(
            api_keys=ingress.api_keys,
            max_body_bytes=ingress.config.max_body_bytes,
            max_upload_bytes=ingress.config.max_upload_bytes,
        ),
    )
    # Clients that set base_url without /v1, and some proxies, use the aliases.
    for i, path in enumerate(("/v1/images/generations", "/images/generations", "/api/images/generations")):
        api.add_api_route(
            path, ingress.create_image, methods=["POST"], response_model=ImagesResponse,
            responses={
                200: {
                    "description": "The images; with `stream: true`, server-sent events.",
                    "content": {"text/event-stream": {"schema": _EVENT_STREAM_SCHEMA}},
                },
                **_errors(400, 401, 413, 429, 500, 503, 504),
            },
            include_in_schema=i == 0, operation_id=None if i == 0 else f"create_image_alias_{i}",
        )
    edit_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _form_schema(ImageEditRequest, ("images", "mask"), with_mask=True)},
                "application/json": {"schema": {"$ref": "#/components/schemas/ImageEditRequest"}},
            },
        }
    }
    variation_body = {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _form_schema(ImageVariationRequest, (), with_mask=False)}},
        }
    }
    for route, handler, extra, events, summary in (
        ("edits", ingress.create_edit, edit_body, EDIT_STREAM_EVENTS, "Edit images (multipart as the SDKs send it, or JSON)"),
        ("variations", ingress.create_variation, variation_body, None, "Variations of an image (dall-e-2 family)"),
    ):
        for i, path in enumerate((f"/v1/images/{route}", f"/images/{route}", f"/api/images/{route}")):
            ok: dict[str, Any] = {"description": "The images" + ("; with `stream: true`, server-sent events." if events else ".")}
            if events:
                ok["content"] = {"text/event-stream": {"schema": _event_stream_schema(events)}}
            api.add_api_route(
                path, handler, methods=["POST"], response_model=ImagesResponse, summary=summary,
                responses={200: ok, **_errors(400, 401, 413, 415, 429, 500, 503, 504)},
                openapi_extra=extra, include_in_schema=i == 0,
                operation_id=f"create_{route}" if i == 0 else f"create_{route}_alias_{i}",
            )
    for i, path in enumerate(("/v1/models", "/models")):
        api.add_api_route(
            path, ingress.list_models, methods=["GET"], response_model=ModelList,
            response_model_exclude_none=True, responses=_errors(401, 500), include_in_schema=i == 0,
        )
    for i, path in enumerate(("/health", "/v1/health")):
        api.add_api_route(
            path, ingress.health, methods=["GET"], response_model=Health, responses=_errors(500, 503),
            include_in_schema=i == 0,
        )
    for method in ("GET", "HEAD"):
        # HEAD is GET without a body; it is left out of the schema, which
        # would otherwise document bodies HEAD never has (and a duplicate operation id).
        api.add_api_route(
            "/v1/images/files/{name}",
            ingress.get_image,
            methods=[method],
            response_class=Response,
            responses={200: {"content": {v: {} for v in CONTENT_TYPES.values()}}, **_errors(403, 404, 500)},
            include_in_schema=method == "GET",
        )
    # The playground page (issue 17): public, outside the API's schema.
    playground = Playground()
    for path in PAGE_PATHS:
        api.add_api_route(path, playground.page, methods=["GET"], include_in_schema=False)
    api.add_api_route(ASSET_PREFIX + "{name}", playground.asset, methods=["GET"], include_in_schema=False)
    api.openapi = _openapi(api)
    return api


def _openapi(api: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, told what the middleware and error mapper do that
    FastAPI cannot see: the API key (RequestGuard), validation errors answered
    400 (errors.validation_error) rather than 422, and the stream's event models."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        doc = generate()
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _, events = models_json_schema(
            [(m, "serialization") for m in dict.fromkeys([*STREAM_EVENTS.values(), *EDIT_STREAM_EVENTS.values()])]
            + [(ImageEditRequest, "validation")],
            ref_template="#/components/schemas/{model}",
        )
        for name, schema in events.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer <key>`."}
        }
        for path, operations in doc.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if not is_public(path):
                    operation["security"] = [{"apiKey": []}]
        return doc

    return openapi
