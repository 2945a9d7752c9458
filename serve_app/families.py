"""The one place that knows each OpenAI model family's rules.

A model id in the registry declares a family; the family decides which
values each parameter may take, the defaults OpenAI documents, and which
parameters it does not use (those are accepted, ignored, and reported in the
``x-ignored-parameters`` header). The request resolver reads these rules;
nothing else hard-codes a family name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# Parameters OpenAI documents for the GPT image models only. A request that
# names no model but uses one of them goes to the configured gpt-image
# default, as OpenAI does.
GPT_IMAGE_ONLY_PARAMS = ("background", "moderation", "output_format", "output_compression", "stream", "partial_images")
# Of those, the ones every family here honours: any model can stream its
# image, and an OpenAI SDK that asked for a stream yields nothing from a plain
# JSON answer.
EVERY_FAMILY_PARAMS = ("stream", "partial_images")

# Quality tiers whose output tokens are billed like `high`.
BILLED_LIKE_HIGH = ("xhigh", "max")
# Output-token factor per quality. dall-e's tiers have no token price at
# OpenAI; a stream's completed event must carry usage, so they count like the
# gpt-image tier that does the same work (standard ~ medium, hd ~ high).
_TOKEN_FACTOR = {"low": 16, "medium": 32, "high": 64, "standard": 32, "hd": 64}

# The largest image the gpt-image-2 generation renders, as OpenAI documents
# it ("the maximum supported resolution is 3840x2160"): no edge longer than
# 3840 and no more pixels than 3840x2160, in either orientation.
MAX_EDGE = 3840
MAX_PIXELS = 3840 * 2160


@dataclass(frozen=True)
class EditRules:
    """What a family's edits (and variations) take as input images."""

    max_images: int  # input images per request
    formats: tuple[str, ...]  # as identified by their bytes
    max_image_bytes: int  # per image
    square_only: bool = False
    # With no mask, the first image's own transparency marks where to edit (dall-e-2).
    alpha_is_mask: bool = False


@dataclass(frozen=True)
class FamilyRules:
    name: str
    max_prompt_chars: int
    max_n: int
    sizes: tuple[str, ...]  # the fixed sizes; free-size families also take others (check_free_size)
    default_size: str
    qualities: tuple[str, ...]  # besides "auto", which every family accepts
    default_quality: str  # what "auto" and an absent quality resolve to
    styles: tuple[str, ...] = ()
    default_style: str | None = None
    default_response_format: str = "url"
    # Whether no size (or `auto`) may give the pipeline's default_size. OpenAI
    # documents 1024x1024 as dall-e's default, whatever the model behind it.
    pipeline_default_size: bool = True
    free_sizes: bool = False  # any WxH within check_free_size's limits
    uses_gpt_image_params: bool = False
    revised_prompt: bool = False
    response_extras: bool = False  # background, output_format, quality, size, usage on the response
    edits: EditRules | None = None  # None: the family has no edits endpoint
    variations: bool = False  # /v1/images/variations (takes the edit rules' inputs)

    def ignored(self, given: dict[str, object]) -> list[str]:
        """Names of the given (non-null) parameters this family does not use."""
        out = []
        if not self.uses_gpt_image_params:
            out += [p for p in GPT_IMAGE_ONLY_PARAMS if p not in EVERY_FAMILY_PARAMS and given.get(p) is not None]
        if not self.styles and given.get("style") is not None:
            out.append("style")
        return out

    def check_free_size(self, width: int, height: int, max_pixels: int) -> str | None:
        """Why a WxH is not acceptable for a free-size family, or None; one
        cause, the first of: sides, aspect ratio, OpenAI's limit, the pipeline's."""
        if width % 16 or height % 16:
            return "both sides must be multiples of 16"
        if max(width, height) > 3 * min(width, height):
            return "the aspect ratio must be between 1:3 and 3:1"
        if max(width, height) > MAX_EDGE or width * height > MAX_PIXELS:
            return f"the largest size is 3840x2160 (no side over {MAX_EDGE} and at most {MAX_PIXELS} pixels)"
        if width * height > max_pixels:
            return f"this model renders at most {max_pixels} pixels (width x height)"
        return None


# The GPT image generations. gpt-image-1, 1-mini and 1.5 (and
# chatgpt-image-latest, which the SDK documents with the same three sizes)
# take the fixed sizes only; gpt-image-2 and later take any size within
# check_free_size's limits; 2.5 and 2.6 add the xhigh and max tiers.
_GPT_IMAGE_1 = FamilyRules(
    name="gpt-image-1",
    max_prompt_chars=32000,
    max_n=10,
    sizes=("1024x1024", "1536x1024", "1024x1536"),
    default_size="1024x1024",
    qualities=("low", "medium", "high"),
    default_quality="medium",
    default_response_format="b64_json",
    uses_gpt_image_params=True,
    response_extras=True,
    edits=EditRules(max_images=16, formats=("png", "webp", "jpeg"), max_image_bytes=50 << 20),
)

FAMILIES: dict[str, FamilyRules] = {
    "dall-e-2": FamilyRules(
        name="dall-e-2",
        max_prompt_chars=1000,
        max_n=10,
        sizes=("256x256", "512x512", "1024x1024"),
        default_size="1024x1024",
        qualities=("standard",),
        default_quality="standard",
        edits=EditRules(max_images=1, formats=("png",), max_image_bytes=4 << 20, square_only=True, alpha_is_mask=True),
        variations=True,
        pipeline_default_size=False,
    ),
    "dall-e-3": FamilyRules(
        name="dall-e-3",
        max_prompt_chars=4000,
        max_n=1,
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        default_size="1024x1024",
        qualities=("standard", "hd"),
        default_quality="standard",
        styles=("vivid", "natural"),
        default_style="vivid",
        pipeline_default_size=False,
        revised_prompt=True,
    ),
    "gpt-image-1": _GPT_IMAGE_1,
    "gpt-image-2": replace(_GPT_IMAGE_1, name="gpt-image-2", free_sizes=True),
    "gpt-image-2.5": replace(
        _GPT_IMAGE_1, name="gpt-image-2.5", free_sizes=True, qualities=("low", "medium", "high", *BILLED_LIKE_HIGH)
    ),
}

# Family names older configs used, and the family that keeps what they
# accepted: `gpt-image` took any size and xhigh/max.
FAMILY_ALIASES = {"gpt-image": "gpt-image-2.5"}


def output_tokens(width: int, height: int, quality: str) -> int:
    """Image output tokens, by the formula that reproduces OpenAI's published
    table: with f = 16, 32, 64 for low, medium, high,
    ceil(H*f/1024) * (ceil(W*f/1024) + 1)."""
    f = _TOKEN_FACTOR["high" if quality in BILLED_LIKE_HIGH else quality]
    return math.ceil(height * f / 1024) * (math.ceil(width * f / 1024) + 1)


def input_image_tokens(width: int, height: int, fidelity: str) -> int:
    """Input tokens of one input image of an edit, counted as OpenAI's vision
    models count images: ``low`` fidelity a flat 85; ``high`` the image
    scaled to fit 2048x2048 and then to a shortest side of at most 768, 170
    per 512x512 tile plus 85."""
    if fidelity == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 170 * math.ceil(w / 512) * math.ceil(h / 512) + 85
