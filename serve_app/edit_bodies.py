"""Reading the bodies of the edits and variations routes into a validated
request and its input images.

Both official SDKs send edits as multipart/form-data: one file as ``image``,
a list as repeated ``image[]``, and ``mask``; every other field arrives as
a string ("2", "true"). Those strings are validated by the same pydantic
model as the JSON body (in pydantic's string mode), so a bad value gets the
same 400 naming the same parameter either way. The multipart body is parsed
by Starlette's streaming parser (python-multipart) with limits; the body as
a whole is capped while it streams in by the RequestGuard middleware.
"""

from __future__ import annotations

from typing import Awaitable, Callable, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serve_app.edits import EditSource
from serve_app.errors import OpenAIError, invalid_request
from serve_app.image_inputs import decode_reference
from serve_app.protocol import ImageEditRequest, ImageReference, ImageVariationRequest

M = TypeVar("M", bound=BaseModel)

# Input images per request, whatever the family (OpenAI's limit), plus the mask.
MAX_FILES = 16 + 1
# Largest non-file form field: a 32000-character prompt in UTF-8, with room.
MAX_FIELD_BYTES = 256 * 1024
IMAGE_FIELDS = ("image", "image[]")

Fetch = Callable[[str, str], Awaitable[bytes]]  # (http(s) URL, param) -> bytes


def _validate(model: type[M], data: dict, strings: bool) -> M:
    try:
        return model.model_validate_strings(data) if strings else model.model_validate(data)
    except ValidationError as exc:
        # The one error mapper turns it into a 400 naming the field.
        raise RequestValidationError(exc.errors()) from None


async def reference_bytes(value: str, param: str, fetch: Fetch) -> bytes:
    """The bytes of an image reference: a data URL, bare base64, or an http(s) URL (fetched if allowed)."""
    ref = decode_reference(value, param)
    return ref if isinstance(ref, bytes) else await fetch(ref, param)


async def _read_form(request: Request) -> tuple[dict[str, str], list[tuple[str, bytes | str]], tuple[str, bytes | str] | None]:
    """(text fields, images in order as (param, file bytes or reference string), mask)."""
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=200, max_part_size=MAX_FIELD_BYTES)
    except (MultiPartException, HTTPException) as exc:
        # The parser's complaints about the body (Starlette raises them as a
        # 400 HTTPException inside an app); anything else is the server's fault.
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or "malformed multipart body"
        raise invalid_request(f"Could not read the multipart form: {detail}", None, "invalid_multipart") from None
    fields: dict[str, str] = {}
    images: list[tuple[str, bytes | str]] = []
    mask = None
    for key in dict.fromkeys(form.keys()):
        values = form.getlist(key)
        if key in IMAGE_FIELDS:
            for value in values:
                images.append((key, await value.read() if isinstance(value, UploadFile) else value))
            continue
        if len(values) > 1:
            raise invalid_request(f"The field '{key}' was given {len(values)} times; give it once.", key, "invalid_value")
        value = values[0]
        if key == "mask":
            mask = (key, await value.read() if isinstance(value, UploadFile) else value)
        elif isinstance(value, UploadFile):
            raise invalid_request(f"The field '{key}' must be text, not a file.", key, "invalid_value")
        else:
            fields[key] = value
    await form.close()
    return fields, images, mask


async def _resolve_refs(items: list[tuple[str, bytes | str]], fetch: Fetch) -> list[tuple[str, bytes]]:
    return [(param, v if isinstance(v, bytes) else await reference_bytes(v, param, fetch)) for param, v in items]


def _json_ref(ref: ImageReference, param: str) -> str:
    if ref.file_id is not None:
        raise invalid_request(
            "file_id is not supported: this server has no Files API. Send the image as image_url (a data URL), "
            "or upload it as multipart/form-data.",
            f"{param}.file_id",
            "unsupported_parameter",
        )
    if not ref.image_url:
        raise invalid_request("Each image needs an image_url.", f"{param}.image_url", "missing_required_parameter")
    return ref.image_url


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_edit(request: Request, fetch: Fetch) -> tuple[ImageEditRequest, EditSource]:
    """The body of POST /v1/images/edits, multipart or JSON."""
    kind = _content_type(request)
    if kind == "multipart/form-data":
        fields, images, mask = await _read_form(request)
        body = _validate(ImageEditRequest, fields, strings=True)
        image_bytes = await _resolve_refs(images, fetch)
        mask_bytes = (await _resolve_refs([mask], fetch))[0] if mask is not None else None
    elif kind == "application/json":
        raw = await request.body()
        try:
            body = ImageEditRequest.model_validate_json(raw or b"null")
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        refs = [(f"images[{i}]", _json_ref(ref, f"images[{i}]")) for i, ref in enumerate(body.images or [])]
        if not refs:
            raise invalid_request("Missing required parameter: 'images'.", "images", "missing_required_parameter")
        image_bytes = await _resolve_refs([(f"{p}.image_url", v) for p, v in refs], fetch)
        mask_bytes = None
        if body.mask is not None:
            mask_bytes = (await _resolve_refs([("mask.image_url", _json_ref(body.mask, "mask"))], fetch))[0]
    else:
        raise _unsupported_media(kind, "multipart/form-data or application/json")
    if not image_bytes:
        raise invalid_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    return body, EditSource("edit", image_bytes, mask_bytes, body.input_fidelity)


async def read_variation(request: Request, fetch: Fetch) -> tuple[ImageVariationRequest, EditSource]:
    """The body of POST /v1/images/variations: multipart, one image."""
    kind = _content_type(request)
    if kind != "multipart/form-data":
        raise _unsupported_media(kind, "multipart/form-data")
    fields, images, mask = await _read_form(request)
    body = _validate(ImageVariationRequest, fields, strings=True)
    if mask is not None:
        raise invalid_request("Variations take no mask.", "mask", "unsupported_parameter")
    image_bytes = await _resolve_refs(images, fetch)
    if not image_bytes:
        raise invalid_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    return body, EditSource("variation", image_bytes)


def as_edit_request(body: ImageVariationRequest) -> ImageEditRequest:
    """A variation's fields in the shape the resolver reads (its prompt comes from the model's config)."""
    return ImageEditRequest.model_construct(
        prompt="", model=body.model, n=body.n, size=body.size, response_format=body.response_format,
        user=body.user, seed=body.seed,
    )


def _unsupported_media(kind: str, expected: str) -> OpenAIError:
    return OpenAIError(
        415, f"Unsupported Content-Type '{kind or 'none'}'; send {expected}.", code="unsupported_media_type"
    )
