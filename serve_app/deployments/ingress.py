"""ImagesIngress deployment: the HTTP face of the service.

Routes are thin: FastAPI validates the body against the protocol models,
:func:`resolve_request` applies the model's rules, :func:`generate` runs the
stages, and the route returns the result. Every error goes through the one
mapper in ``serve_app.errors``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve_app.codecs import CONTENT_TYPES
from serve_app.config import AppConfig, ModelRegistry
from serve_app.errors import OpenAIError, install_error_handlers, request_id_of
from serve_app.generation import HandleStages, generate, resolve_request
from serve_app.middleware import GuardSettings, RequestGuard
from serve_app.protocol import ErrorResponse, ImageGenerationRequest, ImagesResponse, Model, ModelList
from serve_app.security import API_KEYS_ENV, ApiKeys, UrlSigner, hash_for_log
from serve_app.storage import ImageStore

logger = logging.getLogger("serve_app")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 500, 503)
}

api = FastAPI(
    title="Self-hosted OpenAI-compatible Images API",
    version="0.1.0",
    description="OpenAI Images API on a Ray Serve graph of text encoder, denoiser, VAE decoder and post-processor.",
)
install_error_handlers(api)
_guard = GuardSettings()
api.add_middleware(RequestGuard, settings=_guard)


class ImagesIngress:
    def __init__(
        self,
        config: AppConfig,
        registry: ModelRegistry,
        signing_key: str,
        pipelines: dict[str, dict[str, Any]],
        post_processor: Any,
    ):
        import os

        self.config = config
        self.registry = registry
        self.signer = UrlSigner(signing_key, config.url_ttl_s)
        self.store = ImageStore(config.image_store_url)
        self.stages = {
            name: HandleStages(h["text_encoder"], h["denoiser"], h["vae_decoder"], post_processor)
            for name, h in pipelines.items()
        }
        self.created = int(time.time())
        keys = ApiKeys.from_sources(os.environ.get(API_KEYS_ENV), config.api_keys_file)
        _guard.api_keys = keys
        _guard.max_body_bytes = config.max_body_bytes
        if not keys.enabled:
            logger.warning("No API key configured (%s or api_keys_file): the API is open to anyone who can reach it.", API_KEYS_ENV)

    def _image_url(self, request: Request, name: str) -> str:
        base = (self.config.public_base_url or str(request.base_url)).rstrip("/")
        expires, sig = self.signer.sign(name)
        return f"{base}/v1/images/files/{name}?expires={expires}&sig={sig}"

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    @api.post("/images/generations", response_model=ImagesResponse, include_in_schema=False)
    @api.post("/api/images/generations", response_model=ImagesResponse, include_in_schema=False)
    async def create_image(self, body: ImageGenerationRequest, request: Request) -> JSONResponse:
        resolved = resolve_request(body, self.registry)
        logger.info(
            "request %s: model=%s n=%d size=%s prompt_chars=%d user=%s",
            request_id_of(request),
            resolved.model.id,
            resolved.n,
            resolved.size,
            len(body.prompt),
            hash_for_log(body.user) if body.user else "-",
        )
        if resolved.ignored:
            logger.info("request %s: ignored unknown fields %s", request_id_of(request), resolved.ignored)
        result = await generate(
            resolved, self.stages[resolved.model.pipeline], lambda name: self._image_url(request, name)
        )
        return JSONResponse(result.model_dump(exclude_none=True))

    @api.get("/v1/models", response_model=ModelList)
    @api.get("/models", response_model=ModelList, include_in_schema=False)
    async def list_models(self) -> ModelList:
        return ModelList(data=[Model(id=m.id, created=self.created, owned_by=m.owned_by) for m in self.registry.models])

    @api.get("/health")
    @api.get("/v1/health", include_in_schema=False)
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/v1/images/files/{name}",
        responses={200: {"content": {v: {} for v in CONTENT_TYPES.values()}}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    async def get_image(self, name: str, expires: str | None = Query(None), sig: str | None = Query(None)) -> Response:
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
        return Response(data, media_type=CONTENT_TYPES[ext], headers={"Cache-Control": "private, max-age=3600"})


# Ray turns the methods above into routes bound to the replica's instance by
# rewriting their signatures. That has to happen at import time in every
# process that serves them (a rewrite done in the builder's process is lost
# when the class is shipped to replicas), so it is done here, not in app.py.
# ImagesIngress itself stays a plain class.
ImagesIngressASGI = serve.ingress(api)(ImagesIngress)
