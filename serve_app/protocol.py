"""OpenAI Images API request and response models: the single source of the API's shape.

Field names, types and ranges mirror OpenAI's published schema. Types are
strict (``"3"`` is not an ``n``) so a wrong type is a 400 naming the field.
Unknown fields are accepted and logged, never forwarded. Our extensions are
marked as such: ``seed`` on the request, and ``seed`` on each image.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Size = Literal["256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536", "auto"]
Quality = Literal["standard", "hd", "low", "medium", "high", "auto"]
Style = Literal["vivid", "natural"]

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 32000


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="allow")

    prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text description of the image(s).")
    model: StrictStr | None = Field(default=None, description="Model id; the configured default if absent.")
    n: StrictInt | None = Field(default=None, ge=1, le=10, description="Number of images, 1-10.")
    size: Size | None = Field(default=None, description="WIDTHxHEIGHT, or auto for the model's default.")
    response_format: ResponseFormat | None = Field(default=None, description="url or b64_json; default per model family.")
    output_format: OutputFormat | None = Field(default=None, description="png (default), jpeg or webp.")
    output_compression: StrictInt | None = Field(
        default=None, ge=0, le=100, description="0-100 for jpeg and webp (higher keeps more detail); default 100."
    )
    quality: Quality | None = Field(default=None, description="Quality tier.")
    style: Style | None = Field(default=None, description="vivid or natural.")
    user: StrictStr | None = Field(default=None, max_length=256, description="End-user id; logged only as a hash.")
    seed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Extension: seed of the first image's initial noise; image i uses seed + i. Random if absent.",
    )

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class Image(BaseModel):
    b64_json: str | None = Field(default=None, description="Base64-encoded image, for response_format=b64_json.")
    url: str | None = Field(default=None, description="Signed, expiring URL of the image, for response_format=url.")
    revised_prompt: str | None = Field(default=None, description="Prompt actually used (dall-e-3 family).")
    seed: int | None = Field(default=None, description="Extension: the seed that reproduces this image.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time the images were created.")
    data: list[Image]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
