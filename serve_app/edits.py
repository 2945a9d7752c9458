"""Edits and variations: from the client's input images to an edit plan.

The request's own fields are resolved by :func:`serve_app.generation.resolve_request`,
as for generations; this module adds what only edits have: the model
family's rules for input images, decoding them safely
(:mod:`serve_app.image_inputs`), the output size an `auto` edit gets, and
how far into the schedule the edit starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image as PILImage

from serve_app.config import ModelEntry, PipelineConfig
from serve_app.errors import invalid_request
from serve_app.families import FamilyRules, input_image_tokens
from serve_app.image_inputs import InputImage, read_image, read_mask


@dataclass
class EditSource:
    """The input images of an edit or variation, as the client sent them."""

    kind: Literal["edit", "variation"]
    images: list[tuple[str, bytes]]  # (the parameter it came in, the file's bytes); the first is edited
    mask: tuple[str, bytes] | None = None
    input_fidelity: str | None = None


@dataclass
class EditPlan:
    """What the graph needs for an edit, at the output size."""

    kind: Literal["edit", "variation"]
    pixels: np.ndarray  # HxWx3 uint8 RGB: the image to edit
    alpha: np.ndarray | None  # HxW uint8, OpenAI's meaning (0 = edit); None: edit the whole image
    strength: float
    feather_px: int
    image_tokens: int = 0
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    # Every input image's RGB pixels as sent, for architectures that take
    # them whole (references, a vision-language text encoder); how many a
    # model takes is its architecture's rule, checked where the graph learns it.
    images: list[np.ndarray] = field(default_factory=list)
    image_param: str = "image"  # the parameter the images came in, for errors


@dataclass
class DecodedInputs:
    images: list[InputImage]
    alpha: np.ndarray | None  # at the first image's size


def decode_inputs(source: EditSource, model: ModelEntry, rules: FamilyRules, max_pixels: int) -> DecodedInputs:
    """Check the images against the family's rules and decode them; 400 naming the parameter otherwise."""
    edits = rules.edits
    what = "variations" if source.kind == "variation" else "edits"
    if edits is None or (source.kind == "variation" and not rules.variations):
        raise invalid_request(f"Model '{model.id}' does not support image {what}.", "model", "unsupported_model")
    if not source.images:
        raise invalid_request("An image is required.", "image", "missing_required_parameter")
    if len(source.images) > edits.max_images:
        raise invalid_request(
            f"Model '{model.id}' takes at most {edits.max_images} input image(s); got {len(source.images)}.",
            source.images[0][0],
            "too_many_images",
        )
    images = []
    for param, data in source.images:
        image = read_image(data, param, formats=edits.formats, max_bytes=edits.max_image_bytes, max_pixels=max_pixels)
        if edits.square_only and image.width != image.height:
            raise invalid_request(
                f"Model '{model.id}' edits square images only; this one is {image.width}x{image.height}.", param, "invalid_image"
            )
        images.append(image)
    first = images[0]
    alpha = None
    if source.mask is not None:
        param, data = source.mask
        alpha = read_mask(data, param, size=(first.width, first.height), max_bytes=edits.max_image_bytes, max_pixels=max_pixels)
    elif edits.alpha_is_mask and first.has_alpha and (first.pixels[..., 3] < 255).any():
        alpha = first.pixels[..., 3].copy()
    return DecodedInputs(images, alpha)


def auto_size(image: InputImage, candidates: list[str]) -> str:
    """The candidate size nearest the image's aspect ratio, then nearest its pixel count."""
    aspect = math.log(image.width / image.height)
    pixels = image.width * image.height

    def distance(size: str) -> tuple[float, float]:
        w, h = map(int, size.split("x"))
        return (round(abs(math.log(w / h) - aspect), 6), abs(math.log(w * h / pixels)))

    return min(candidates, key=distance)


def plan_edit(
    source: EditSource, inputs: DecodedInputs, model: ModelEntry, pipeline: PipelineConfig, width: int, height: int
) -> EditPlan:
    """The first image (and mask) at the output size, and the edit's strength."""
    first = inputs.images[0]
    preset = model.edit
    pixels = first.pixels[..., :3]
    if (first.width, first.height) != (width, height):
        # Stretched to the output size (an `auto` size keeps the aspect close);
        # the mask goes along with nearest-neighbour so it stays crisp.
        pixels = np.asarray(PILImage.fromarray(np.ascontiguousarray(pixels)).resize((width, height), PILImage.LANCZOS))
    alpha = inputs.alpha
    if alpha is not None and alpha.shape != (height, width):
        alpha = np.asarray(PILImage.fromarray(alpha).resize((width, height), PILImage.NEAREST))
    fidelity = source.input_fidelity or "low"
    if source.kind == "variation":
        strength = preset.variation_strength
    elif alpha is not None:
        strength = preset.inpaint_strength
    else:
        strength = preset.strength[fidelity]
    return EditPlan(
        kind=source.kind,
        pixels=np.ascontiguousarray(pixels),
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        strength=strength,
        feather_px=preset.feather_px,
        image_tokens=sum(input_image_tokens(i.width, i.height, fidelity) for i in inputs.images),
        input_sizes=[(i.width, i.height) for i in inputs.images],
        images=[np.ascontiguousarray(i.pixels[..., :3]) for i in inputs.images],
        image_param=source.images[0][0],
    )
