"""OpenAI Images API request and response models: the single source of the API's shape.

Field names, types and ranges mirror OpenAI's published schema. Types are
strict (``"3"`` is not an ``n``) so a wrong type is a 400 naming the field.
Unknown fields are accepted and logged, never forwarded. Our extensions are
marked as such: ``seed`` on the request, and ``seed`` on each image.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

ResponseFormat = Literal["url", "b64_json"]
# gif is in today's SDK; it validates here and the resolver refuses it with
# a message saying why. svg is the finished raster traced to vectors.
OutputFormat = Literal["png", "jpeg", "webp", "gif", "svg"]
Quality = Literal["standard", "hd", "low", "medium", "high", "xhigh", "max", "auto"]
# What a response or stream event reports: the tier the request resolved to
# (never auto). A dall-e stream reports its own tiers, standard and hd.
ResolvedQuality = Literal["standard", "hd", "low", "medium", "high", "xhigh", "max"]
# Stream events carry raster images only: svg is never streamed.
StreamedFormat = Literal["png", "jpeg", "webp"]
Style = Literal["vivid", "natural"]
Background = Literal["transparent", "opaque", "auto"]
Moderation = Literal["low", "auto"]
Complexity = Literal["low", "medium", "high"]
InputFidelity = Literal["low", "high"]
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$"

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 32000


class _ImageRequest(BaseModel):
    """The fields every image-producing request shares (generations, edits)."""

    model_config = ConfigDict(extra="allow")

    prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text description of the image(s).")
    model: StrictStr | None = Field(default=None, description="Model id; the configured default if absent.")
    n: StrictInt | None = Field(default=None, ge=1, le=10, description="Number of images, 1-10 (dall-e-3: 1).")
    size: StrictStr | None = Field(
        default=None,
        pattern=SIZE_PATTERN,
        description="WIDTHxHEIGHT or auto. Fixed lists for dall-e-2/3 and gpt-image-1; gpt-image-2 and later also "
        "take any WxH with sides multiple of 16, aspect within 1:3..3:1, up to 3840x2160 and the model's pixel limit.",
    )
    response_format: ResponseFormat | None = Field(default=None, description="url or b64_json; default per model family.")
    output_format: OutputFormat | None = Field(
        default=None, description="png (default), jpeg, webp or svg (gpt-image; svg: n=1, no stream)."
    )
    output_compression: StrictInt | None = Field(
        default=None, ge=0, le=100, description="0-100 for jpeg and webp (higher keeps more detail); default 100."
    )
    quality: Quality | None = Field(default=None, description="Quality tier; allowed values depend on the model family.")
    background: Background | None = Field(default=None, description="transparent, opaque or auto (gpt-image).")
    moderation: Moderation | None = Field(default=None, description="auto (all categories) or low (severe only).")
    stream: StrictBool | None = Field(default=None, description="Stream partial images as server-sent events (every model).")
    partial_images: StrictInt | None = Field(default=None, ge=0, le=3, description="Partial images to stream, 0-3.")
    user: StrictStr | None = Field(default=None, max_length=256, description="End-user id; logged only as a hash.")
    safety_identifier: StrictStr | None = Field(
        default=None, max_length=256, description="Stable end-user id; takes precedence over `user`."
    )
    seed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Extension: seed of the first image's initial noise; image i uses seed + i. Random if absent.",
    )

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class ImageGenerationRequest(_ImageRequest):
    """Body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"prompt": "A sea otter asleep on a kelp bed, watercolor", "model": "dall-e-2", "n": 2, "size": "256x256"},
                {"prompt": "A lighthouse at dusk", "model": "gpt-image-1", "size": "1024x1024", "quality": "low"},
                {"prompt": "A red fox in snow", "model": "gpt-image-2", "size": "1536x864", "stream": True, "partial_images": 2},
            ]
        },
    )

    style: Style | None = Field(default=None, description="vivid or natural (dall-e-3).")
    complexity: Complexity | None = Field(default=None, description="Accepted; ignored unless the model maps it to a preset.")
    frame_count: StrictInt | None = Field(default=None, ge=2, le=16, description="GIF frames (gif is not supported).")
    frame_duration_ms: StrictInt | None = Field(default=None, ge=1, le=60000, description="GIF frame delay (gif is not supported).")
    image: StrictStr | list[StrictStr] | None = Field(
        default=None,
        description="Makes the request an edit of these images (as /v1/images/edits): each a data URL, bare base64, "
        "or an http(s) URL (fetched only where the server allows it).",
    )


class ImageReference(BaseModel):
    """An input image of the JSON edits body."""

    model_config = ConfigDict(extra="forbid")

    image_url: StrictStr | None = Field(default=None, description="A data URL, or an http(s) URL the server may fetch.")
    file_id: StrictStr | None = Field(default=None, description="Not supported: this server has no Files API.")


class ImageEditRequest(_ImageRequest):
    """Body of ``POST /v1/images/edits``: JSON, or multipart form fields (the
    images then come as files ``image`` / ``image[]`` and ``mask``)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Add a red hat",
                    "model": "gpt-image-1",
                    "images": [{"image_url": "data:image/png;base64,iVBORw0KGgo..."}],
                }
            ]
        },
    )

    images: list[ImageReference] | None = Field(
        default=None, min_length=1, max_length=16, description="JSON body: the input images (the first is edited)."
    )
    mask: ImageReference | None = Field(
        default=None, description="JSON body: a PNG the size of the first image; alpha 0 marks where to edit."
    )
    input_fidelity: InputFidelity | None = Field(
        default=None, description="low or high: how closely the edit keeps the input (gpt-image)."
    )


class ImageVariationRequest(BaseModel):
    """Form fields of ``POST /v1/images/variations`` (the image comes as the file ``image``)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = Field(default=None, description="Model id (dall-e-2 family); the configured default if absent.")
    n: StrictInt | None = Field(default=None, ge=1, le=10, description="Number of variations, 1-10.")
    size: StrictStr | None = Field(default=None, pattern=SIZE_PATTERN, description="256x256, 512x512 or 1024x1024.")
    response_format: ResponseFormat | None = Field(default=None, description="url or b64_json.")
    user: StrictStr | None = Field(default=None, max_length=256, description="End-user id; logged only as a hash.")
    seed: StrictInt | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Extension: seed of the first variation; variation i uses seed + i."
    )

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class Image(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64_json: str | None = Field(default=None, description="Base64-encoded image, for response_format=b64_json.")
    url: str | None = Field(default=None, description="Signed, expiring URL of the image, for response_format=url.")
    revised_prompt: str | None = Field(default=None, description="Prompt actually encoded (dall-e-3 family).")
    seed: int | None = Field(default=None, description="Extension: the seed that reproduces this image.")


class InputTokensDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    created: int = Field(description="Unix time the images were created.")
    data: list[Image]
    background: Literal["transparent", "opaque"] | None = None
    output_format: Literal["png", "jpeg", "webp", "svg"] | None = None
    quality: ResolvedQuality | None = None
    size: str | None = None
    usage: Usage | None = None
    safety_identifier: str | None = None


class _StreamEventBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64_json: str
    created_at: int
    size: str
    quality: ResolvedQuality
    background: Literal["transparent", "opaque"]
    output_format: StreamedFormat


class PartialImageEvent(_StreamEventBase):
    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int


class CompletedEvent(_StreamEventBase):
    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: Usage


# An edit's events carry the same fields under their own type names.
class EditPartialImageEvent(PartialImageEvent):
    type: Literal["image_edit.partial_image"] = "image_edit.partial_image"  # type: ignore[assignment]


class EditCompletedEvent(CompletedEvent):
    type: Literal["image_edit.completed"] = "image_edit.completed"  # type: ignore[assignment]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions, so clients can discover what a model takes.
    family: str | None = None
    sizes: list[str] | None = None
    qualities: list[str] | None = None
    default_steps: int | None = None
    max_pixels: int | None = Field(
        default=None,
        description="Models that take any WxH (sides multiples of 16, aspect 1:3 to 3:1): the largest width x height. "
        "Absent where only the listed sizes are served.",
    )


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"]


# A streamed generation (``stream: true``) is a text/event-stream whose
# events are named by their data's type: previews, then the completed image;
# an error after the stream has started arrives as an ``error`` event.
STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "image_generation.partial_image": PartialImageEvent,
    "image_generation.completed": CompletedEvent,
    "error": ErrorResponse,
}
# A streamed edit (``/v1/images/edits`` with ``stream: true``) names its events image_edit.*.
EDIT_STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "image_edit.partial_image": EditPartialImageEvent,
    "image_edit.completed": EditCompletedEvent,
    "error": ErrorResponse,
}
