"""From a validated request to an OpenAI response: resolution and orchestration.

Both are plain code with no Ray in them. The ingress passes Ray deployment
handles wrapped as :class:`Stages`; tests pass stage objects run in-process.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from serve_app.config import ModelEntry, ModelRegistry, PipelineConfig, parse_size
from serve_app.errors import invalid_request, storage_unavailable
from serve_app.families import FAMILIES
from serve_app.pipeline.types import DenoiseJob, PromptEmbeddings
from serve_app.protocol import MAX_SEED, Image, ImageGenerationRequest, ImagesResponse
from serve_app.storage import StorageError

logger = logging.getLogger("serve_app")


@dataclass
class ResolvedRequest:
    """A request with every default filled in and every rule checked."""

    model: ModelEntry
    pipeline: PipelineConfig
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seeds: list[int]
    response_format: str
    output_format: str
    output_compression: int
    ignored: list[str] = field(default_factory=list)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def resolve_request(req: ImageGenerationRequest, registry: ModelRegistry) -> ResolvedRequest:
    """Apply the model's rules and defaults; raise a 400 naming the parameter on a conflict."""
    model_id = req.model or registry.default_model
    model = registry.model(model_id)
    if model is None:
        raise invalid_request(
            f"The model '{model_id}' does not exist or you do not have access to it.", "model", "model_not_found"
        )
    pipeline = registry.pipelines[model.pipeline]
    rules = FAMILIES[model.family]

    size = req.size or "auto"
    if size == "auto":
        size = pipeline.default_size
    if size not in pipeline.sizes:
        raise invalid_request(
            f"Invalid size '{size}' for model '{model.id}'. Supported sizes: {', '.join(pipeline.sizes)}.",
            "size",
            "invalid_size",
        )
    width, height = parse_size(size)

    n = req.n if req.n is not None else 1
    if req.seed is not None and req.seed + n - 1 > MAX_SEED:
        raise invalid_request(f"seed + n - 1 must not exceed {MAX_SEED}.", "seed")
    first = req.seed if req.seed is not None else secrets.randbelow(2**32)
    return ResolvedRequest(
        model=model,
        pipeline=pipeline,
        prompt=req.prompt,
        n=n,
        width=width,
        height=height,
        steps=pipeline.default_steps,
        guidance=pipeline.default_guidance,
        seeds=[first + i for i in range(n)],
        response_format=req.response_format or rules.default_response_format,
        output_format=req.output_format or rules.default_output_format,
        output_compression=req.output_compression if req.output_compression is not None else 100,
        ignored=req.unknown_fields(),
    )


class Stages(Protocol):
    """The stage calls one request makes, whatever runs them."""

    async def encode(self, prompt: str) -> PromptEmbeddings: ...
    async def denoise(self, job: DenoiseJob) -> np.ndarray: ...
    async def decode(self, latents: np.ndarray) -> np.ndarray: ...
    async def postprocess(self, pixels: np.ndarray, output_format: str, compression: int, response_format: str) -> dict[str, str]: ...
    async def discard(self, names: list[str]) -> None: ...
    async def problem(self) -> str | None: ...


class HandleStages:
    """Stages backed by Ray Serve deployment handles."""

    def __init__(self, text_encoder: Any, denoiser: Any, vae_decoder: Any, post_processor: Any):
        self._te, self._dn, self._vae, self._pp = text_encoder, denoiser, vae_decoder, post_processor

    async def encode(self, prompt: str) -> PromptEmbeddings:
        return await self._te.encode.remote(prompt)

    async def denoise(self, job: DenoiseJob) -> np.ndarray:
        return await self._dn.denoise.remote(job)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await self._vae.decode.remote(latents)

    async def postprocess(self, pixels: np.ndarray, output_format: str, compression: int, response_format: str) -> dict[str, str]:
        return await self._pp.process.remote(pixels, output_format, compression, response_format)

    async def discard(self, names: list[str]) -> None:
        await self._pp.discard.remote(names)

    async def problem(self) -> str | None:
        """Why this pipeline's model stages cannot serve, or None."""
        problems = await asyncio.gather(self._te.problem.remote(), self._dn.problem.remote(), self._vae.problem.remote())
        return next((p for p in problems if p), None)


async def generate(
    r: ResolvedRequest,
    stages: Stages,
    url_for: Callable[[str], str],
    clock: Callable[[], float] = time.time,
) -> ImagesResponse:
    """Run one request through the stages and assemble the OpenAI response."""
    # 1. Encode the prompt once, whatever n is.
    embeddings = await stages.encode(r.prompt)
    # 2. Denoise all n images as one batch, each from its own seed.
    job = DenoiseJob(embeddings, r.seeds, r.height, r.width, r.steps, r.guidance)
    latents = await stages.denoise(job)
    # 3. Decode the batch to pixels.
    pixels = await stages.decode(latents)
    # 4. Encode (and store) each image; images can go to different replicas.
    outputs: list[Awaitable[dict[str, str]]] = [
        stages.postprocess(pixels[i], r.output_format, r.output_compression, r.response_format) for i in range(r.n)
    ]
    encoded = await asyncio.gather(*outputs, return_exceptions=True)
    # All or nothing: if any image fails, or its URL cannot be made, the
    # images already stored for this request are removed again.
    stored = [out["name"] for out in encoded if isinstance(out, dict) and "name" in out]
    failures = [e for e in encoded if isinstance(e, BaseException)]
    if failures:
        await _discard(stages, stored)
        storage_failures = [e for e in failures if isinstance(e, StorageError)]
        if storage_failures:
            logger.error("storing images failed: %s", storage_failures[0])
            raise storage_unavailable() from storage_failures[0]
        raise failures[0]
    try:
        data = [
            Image(url=url_for(out["name"]), seed=seed) if "name" in out else Image(b64_json=out["b64_json"], seed=seed)
            for seed, out in zip(r.seeds, encoded)
        ]
    except Exception:
        await _discard(stages, stored)
        raise
    return ImagesResponse(created=int(clock()), data=data)


async def _discard(stages: Stages, names: list[str]) -> None:
    if not names:
        return
    try:
        await stages.discard(names)
    except Exception:  # noqa: BLE001 - the sweeper or a lifecycle rule removes them later
        logger.exception("could not discard %d stored images of a failed request", len(names))
