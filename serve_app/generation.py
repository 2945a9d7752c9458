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
from typing import Any, AsyncIterator, Callable, Protocol

import numpy as np

from serve_app.config import ModelEntry, ModelRegistry, PipelineConfig
from serve_app.edits import DecodedInputs, EditPlan, EditSource, auto_size, decode_inputs, plan_edit
from serve_app.errors import invalid_request, storage_unavailable
from serve_app.families import FAMILIES, MAX_PIXELS, GPT_IMAGE_ONLY_PARAMS, FamilyRules, output_tokens
from serve_app.pipeline.types import DenoiseJob, EditInputs, EditLatents, PromptEmbeddings
from serve_app.protocol import (
    MAX_SEED,
    CompletedEvent,
    EditCompletedEvent,
    EditPartialImageEvent,
    Image,
    ImagesResponse,
    InputTokensDetails,
    PartialImageEvent,
    Usage,
    _ImageRequest,
)
from serve_app.storage import StorageError

logger = logging.getLogger("serve_app")


@dataclass
class ResolvedRequest:
    """A request with every default filled in and every rule checked."""

    model: ModelEntry
    rules: FamilyRules
    pipeline: PipelineConfig
    user_prompt: str
    prompt: str  # what the text encoder gets: after the style or backdrop template
    n: int
    width: int
    height: int
    quality: str  # the resolved tier name
    steps: int
    guidance: float
    seeds: list[int]
    response_format: str
    output_format: str
    output_compression: int
    background: str  # "transparent" or "opaque"
    moderation: str
    stream: bool = False
    partial_images: int = 0
    end_user: str | None = None  # safety_identifier, else user
    ignored: list[str] = field(default_factory=list)
    edit: EditPlan | None = None  # an edit or variation of an input image
    events: str = "image_generation"  # stream event prefix: image_generation, or image_edit on the edits route

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def _pick_model(req: _ImageRequest, registry: ModelRegistry) -> ModelEntry:
    if req.model is not None:
        model_id = req.model
    elif any(getattr(req, p) is not None for p in GPT_IMAGE_ONLY_PARAMS):
        model_id = registry.gpt_image_default()
    else:
        model_id = registry.default_model
    model = registry.model(model_id)
    if model is None and registry.fallback_model is not None:
        model = registry.model(registry.fallback_model)
    if model is None:
        raise invalid_request(
            f"The model '{model_id}' does not exist or you do not have access to it. "
            "GET /v1/models lists the models this server serves.",
            "model",
            "model_not_found",
        )
    return model


def _dimensions(size: str) -> tuple[int, int]:
    # The protocol's SIZE_PATTERN has already checked the WxH form.
    width, height = size.split("x")
    return int(width), int(height)


def _fixed_sizes(rules: FamilyRules, pipeline: PipelineConfig) -> list[str]:
    """The family's fixed sizes, as far as the pipeline renders them."""
    return [s for s in rules.sizes if s in pipeline.sizes]


def _size_problem(size: str, rules: FamilyRules, pipeline: PipelineConfig) -> str | None:
    """Why this family on this pipeline cannot serve a WxH size (one cause), or None."""
    if size in _fixed_sizes(rules, pipeline):
        return None
    if not rules.free_sizes:
        return "not one of this model's sizes"
    return rules.check_free_size(*_dimensions(size), pipeline.max_pixels)


def default_size(model: ModelEntry, pipeline: PipelineConfig) -> str | None:
    """What no size or `auto` gives: the model's default_size, else the
    pipeline's where the family allows it, else the family's; the first of
    them the model can serve."""
    rules = FAMILIES[model.family]
    candidates = (model.default_size, pipeline.default_size if rules.pipeline_default_size else None, rules.default_size)
    return next((c for c in candidates if c and _size_problem(c, rules, pipeline) is None), None)


def served_sizes(model: ModelEntry, pipeline: PipelineConfig) -> list[str]:
    """The sizes /v1/models advertises for a model: its family's fixed sizes
    the pipeline renders, its default size (so that every size a response
    names is listed), and `auto` where OpenAI documents it (the GPT image
    models; every family here accepts it)."""
    rules = FAMILIES[model.family]
    sizes = _fixed_sizes(rules, pipeline)
    default = default_size(model, pipeline)
    if default is not None and default not in sizes:
        sizes.append(default)
    return sizes + (["auto"] if rules.uses_gpt_image_params else [])


def free_size_limit(model: ModelEntry, pipeline: PipelineConfig) -> int | None:
    """The largest width x height a free-size model takes (OpenAI's limit or
    the pipeline's, the lower); None for a model with fixed sizes only."""
    return min(MAX_PIXELS, pipeline.max_pixels) if FAMILIES[model.family].free_sizes else None


def served_qualities(model: ModelEntry, pipeline: PipelineConfig) -> list[str]:
    return [*FAMILIES[model.family].qualities, "auto"]


def _resolve_size(
    req: _ImageRequest, model: ModelEntry, rules: FamilyRules, pipeline: PipelineConfig, inputs: DecodedInputs | None
) -> tuple[int, int]:
    size = req.size or "auto"
    if size == "auto" and inputs is not None:
        # An edit keeps its (first) input's aspect: the nearest size the model serves.
        return _dimensions(auto_size(inputs.images[0], [s for s in served_sizes(model, pipeline) if s != "auto"]))
    if size == "auto":
        default = default_size(model, pipeline)
        if default is None:
            raise invalid_request(f"Model '{model.id}' has no default size it can serve; name a size.", "size")
        return _dimensions(default)
    problem = _size_problem(size, rules, pipeline)
    if problem is None:
        return _dimensions(size)
    if rules.free_sizes:
        message = f"Invalid size '{size}' for model '{model.id}': {problem}."
    else:
        message = f"Invalid size '{size}' for model '{model.id}'. Supported sizes: {', '.join(served_sizes(model, pipeline))}."
    raise invalid_request(message, "size", "invalid_size")


def resolve_request(
    req: _ImageRequest, registry: ModelRegistry, source: EditSource | None = None, max_input_pixels: int = 4096 * 4096
) -> ResolvedRequest:
    """Apply the model family's rules and the model's config; raise a 400 naming the parameter on a conflict.
    With ``source``, the request edits (or varies) those input images."""
    model = _pick_model(req, registry)
    rules = FAMILIES[model.family]
    pipeline = registry.pipelines[model.pipeline]
    given = req.model_dump(exclude_none=True, exclude={"images", "mask", "image"})
    ignored = rules.ignored(given)
    # 0. Input images first: their rules depend on the family, and `auto` size on them.
    inputs = decode_inputs(source, model, rules, max_input_pixels) if source is not None else None
    # A variation has no prompt of its own: it is conditioned on the model's variation prompt.
    user_prompt = model.edit.variation_prompt if source is not None and source.kind == "variation" else req.prompt

    # 1. Hard limits of the family.
    if len(user_prompt) > rules.max_prompt_chars:
        raise invalid_request(
            f"The prompt is too long for model '{model.id}': {len(user_prompt)} characters, at most {rules.max_prompt_chars}.",
            "prompt",
            "string_above_max_length",
        )
    n = req.n if req.n is not None else 1
    if n > rules.max_n:
        raise invalid_request(f"Model '{model.id}' generates at most {rules.max_n} image(s) per request; n={n}.", "n")
    if req.output_format == "gif":
        raise invalid_request(
            "The output format 'gif' is not supported: this server makes still images. Use png, jpeg, webp or svg.",
            "output_format",
            "unsupported_output_format",
        )
    ignored += [p for p in ("frame_count", "frame_duration_ms") if p in given]

    # 2. Size.
    width, height = _resolve_size(req, model, rules, pipeline, inputs)

    # 3. Quality -> steps and guidance.
    quality = req.quality if req.quality not in (None, "auto") else rules.default_quality
    tier = model.tier(quality, pipeline) if quality in rules.qualities else None
    if tier is None:
        raise invalid_request(
            f"Invalid quality '{quality}' for model '{model.id}'. Supported: {', '.join(served_qualities(model, pipeline))}.",
            "quality",
        )
    steps, guidance = tier
    complexity = getattr(req, "complexity", None)
    if complexity is not None:
        preset = model.complexity.get(complexity)
        if preset is None:
            ignored.append("complexity")
        else:
            steps = preset.steps or steps
            guidance = preset.guidance if preset.guidance is not None else guidance

    # 4. Style (dall-e-3) and background (gpt-image) shape the prompt.
    prompt = user_prompt
    if rules.styles:
        preset = model.styles.get(getattr(req, "style", None) or rules.default_style or "")
        if preset is not None:
            prompt = preset.template.format(prompt=user_prompt)
            guidance = preset.guidance if preset.guidance is not None else guidance
    background = "opaque"
    output_format, compression = "png", 100
    if rules.uses_gpt_image_params:
        background = model.background_auto if req.background in (None, "auto") else req.background
        output_format = req.output_format or "png"
        compression = req.output_compression if req.output_compression is not None else 100
        if background == "transparent":
            if output_format == "jpeg":
                raise invalid_request(
                    "A transparent background needs an output format with alpha: png or webp, not jpeg.", "background"
                )
            prompt = model.transparent_template.format(prompt=user_prompt)

    # 5. Streaming, for every family (partial_images means nothing without it).
    stream = bool(req.stream)
    partial_images = req.partial_images or 0
    if req.partial_images is not None and not stream:
        ignored.append("partial_images")

    # 6. SVG is the finished image traced once: like OpenAI's, one image and no stream.
    if output_format == "svg":
        if n > 1:
            raise invalid_request(f"SVG output makes one image per request; n={n}.", "n")
        if stream:
            raise invalid_request("SVG output cannot be streamed; send stream=false.", "stream")
        if req.output_compression is not None:
            ignored.append("output_compression")

    if req.seed is not None and req.seed + n - 1 > MAX_SEED:
        raise invalid_request(f"seed + n - 1 must not exceed {MAX_SEED}.", "seed")
    first = req.seed if req.seed is not None else secrets.randbelow(2**32)
    return ResolvedRequest(
        model=model,
        rules=rules,
        pipeline=pipeline,
        user_prompt=user_prompt,
        prompt=prompt,
        n=n,
        width=width,
        height=height,
        quality=quality,
        steps=steps,
        guidance=guidance,
        seeds=[first + i for i in range(n)],
        response_format=req.response_format or rules.default_response_format,
        output_format=output_format,
        output_compression=compression,
        background=background,
        moderation=(req.moderation or "auto") if rules.uses_gpt_image_params else "auto",
        stream=stream,
        partial_images=partial_images if stream else 0,
        end_user=req.safety_identifier or req.user,
        ignored=sorted(set(ignored + req.unknown_fields())),
        edit=plan_edit(source, inputs, model, pipeline, width, height) if source is not None and inputs is not None else None,
    )


class Stages(Protocol):
    """The stage calls a request makes, whatever runs them."""

    async def encode(self, prompt: str, count_prompt: str, images: list[np.ndarray] | None = None) -> PromptEmbeddings: ...
    async def edit_inputs(self) -> EditInputs: ...
    async def encode_image(
        self, pixels: np.ndarray, alpha: np.ndarray | None, references: list[np.ndarray] | None = None
    ) -> EditLatents: ...
    async def denoise(self, job: DenoiseJob) -> np.ndarray: ...
    def denoise_stream(self, job: DenoiseJob, partial_images: int) -> AsyncIterator[tuple[str, np.ndarray]]: ...
    async def decode(self, latents: np.ndarray) -> np.ndarray: ...
    async def postprocess(self, pixels: np.ndarray, spec: "PostProcessSpec") -> dict[str, str]: ...
    async def discard(self, names: list[str]) -> None: ...
    async def problem(self) -> str | None: ...


@dataclass(frozen=True)
class PostProcessSpec:
    """How the post-processor should finish one image."""

    output_format: str
    compression: int
    response_format: str  # "b64_json" or "url"
    transparent: bool = False
    # An inpainting edit: the input's pixels go back wherever this alpha (OpenAI's mask) protects them.
    keep_pixels: np.ndarray | None = None
    keep_alpha: np.ndarray | None = None
    feather_px: int = 0


def usage_for(r: ResolvedRequest, embeddings: PromptEmbeddings, images: int) -> Usage:
    text_tokens = embeddings.token_count
    image_tokens = r.edit.image_tokens if r.edit is not None else 0
    out = images * output_tokens(r.width, r.height, r.quality)
    return Usage(
        input_tokens=text_tokens + image_tokens,
        input_tokens_details=InputTokensDetails(text_tokens=text_tokens, image_tokens=image_tokens),
        output_tokens=out,
        total_tokens=text_tokens + image_tokens + out,
    )


def _final_spec(r: ResolvedRequest, response_format: str) -> PostProcessSpec:
    keep = {}
    if r.edit is not None and r.edit.alpha is not None:
        keep = dict(keep_pixels=r.edit.pixels, keep_alpha=r.edit.alpha, feather_px=r.edit.feather_px)
    return PostProcessSpec(r.output_format, r.output_compression, response_format, r.background == "transparent", **keep)


async def _condition(r: ResolvedRequest, stages: Stages) -> tuple[PromptEmbeddings, EditLatents | None]:
    """Encode the prompt and, for an edit, the input image(s) (concurrently:
    they run on different stages). The model's architecture says how many
    images an edit takes and which stages see them as sent."""
    if r.edit is None:
        return await stages.encode(r.prompt, r.user_prompt), None
    takes = await stages.edit_inputs()
    images = r.edit.images
    if len(images) > takes.max_images:
        message = (
            f"Model '{r.model.id}' edits one image at a time and cannot use reference images; send one image."
            if takes.max_images == 1
            else f"Model '{r.model.id}' takes at most {takes.max_images} input images; got {len(images)}."
        )
        raise invalid_request(message, r.edit.image_param, "too_many_images")
    embeddings, latents = await asyncio.gather(
        stages.encode(r.prompt, r.user_prompt, images if takes.text_sees_images else None),
        stages.encode_image(r.edit.pixels, r.edit.alpha, images if takes.references else None),
    )
    return embeddings, latents


def _job(r: ResolvedRequest, embeddings: PromptEmbeddings, edit: EditLatents | None = None) -> DenoiseJob:
    # A reference edit (FLUX.1 Kontext, FLUX.2) starts from noise and runs
    # every step: strength 1, whatever the edit preset says.
    strength = r.edit.strength if r.edit is not None and not (edit is not None and edit.references) else 1.0
    return DenoiseJob(embeddings, r.seeds, r.height, r.width, r.steps, r.guidance, edit=edit, strength=strength)


async def generate(
    r: ResolvedRequest,
    stages: Stages,
    url_for: Callable[[str], str],
    clock: Callable[[], float] = time.time,
) -> ImagesResponse:
    """Run one request through the stages and assemble the OpenAI response."""
    # 1. Encode the prompt once, whatever n is (and an edit's input image).
    embeddings, edit = await _condition(r, stages)
    # 2. Denoise all n images as one batch, each from its own seed.
    latents = await stages.denoise(_job(r, embeddings, edit))
    # 3. Decode the batch to pixels.
    pixels = await stages.decode(latents)
    # 4. Encode (and store) each image; images can go to different replicas.
    spec = _final_spec(r, r.response_format)
    encoded = await asyncio.gather(*(stages.postprocess(pixels[i], spec) for i in range(r.n)), return_exceptions=True)
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
    revised = embeddings.encoded_prompt if r.rules.revised_prompt else None
    try:
        data = [
            Image(url=url_for(out["name"]), seed=seed, revised_prompt=revised)
            if "name" in out
            else Image(b64_json=out["b64_json"], seed=seed, revised_prompt=revised)
            for seed, out in zip(r.seeds, encoded)
        ]
    except Exception:
        await _discard(stages, stored)
        raise
    response = ImagesResponse(created=int(clock()), data=data)
    if r.rules.response_extras:
        response.background = r.background
        response.output_format = r.output_format
        response.quality = r.quality
        response.size = r.size
        response.usage = usage_for(r, embeddings, r.n)
        response.safety_identifier = r.end_user
    return response


async def _discard(stages: Stages, names: list[str]) -> None:
    if not names:
        return
    try:
        await stages.discard(names)
    except Exception:  # noqa: BLE001 - the sweeper or a lifecycle rule removes them later
        logger.exception("could not discard %d stored images of a failed request", len(names))


async def generate_stream(
    r: ResolvedRequest, stages: Stages, clock: Callable[[], float] = time.time
) -> AsyncIterator[PartialImageEvent | CompletedEvent | EditPartialImageEvent | EditCompletedEvent]:
    """Like :func:`generate`, as events: each image's previews as the denoiser
    reaches them, then each image's completed event. Streamed images are
    always base64, as in OpenAI's API."""
    embeddings, edit = await _condition(r, stages)
    job = _job(r, embeddings, edit)
    common = dict(size=r.size, quality=r.quality, background=r.background, output_format=r.output_format)
    preview_spec = PostProcessSpec(r.output_format, r.output_compression, "b64_json", False)
    partial_event, completed_event = (
        (EditPartialImageEvent, EditCompletedEvent) if r.events == "image_edit" else (PartialImageEvent, CompletedEvent)
    )
    index = 0
    # The denoiser spaces the previews: only the architecture knows how many
    # steps an edit of this strength runs (SD rounds steps x strength down
    # first, SD3, FLUX and Z-Image after subtracting it from the steps).
    async for kind, latents in stages.denoise_stream(job, r.partial_images):
        pixels = await stages.decode(latents)
        if kind == "preview":
            encoded = await asyncio.gather(*(stages.postprocess(pixels[i], preview_spec) for i in range(r.n)))
            for out in encoded:
                yield partial_event(b64_json=out["b64_json"], created_at=int(clock()), partial_image_index=index, **common)
            index += 1
        else:
            spec = _final_spec(r, "b64_json")
            encoded = await asyncio.gather(*(stages.postprocess(pixels[i], spec) for i in range(r.n)))
            usage = usage_for(r, embeddings, 1)
            for out in encoded:
                yield completed_event(b64_json=out["b64_json"], created_at=int(clock()), usage=usage, **common)
