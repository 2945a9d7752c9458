"""The model-family rules, one case per table cell that can fail, on the resolver alone."""

from __future__ import annotations

import pytest

from pydantic import ValidationError

from serve_app.config import ModelRegistry, load_registry
from serve_app.errors import OpenAIError
from serve_app.families import FAMILIES, output_tokens
from serve_app.generation import default_size, resolve_request, served_sizes
from serve_app.pipeline.types import preview_steps
from serve_app.protocol import ImageGenerationRequest

REGISTRY = load_registry("configs/models.yaml")
DEFAULT_STEPS = REGISTRY.pipelines["embedded-sd"].default_steps

# Every model id in the current SDK (openai.types.ImageModel) and the family the shipped registry gives it.
SDK_MODEL_FAMILIES = {
    "gpt-image-2": "gpt-image-2",
    "gpt-image-2-2026-04-21": "gpt-image-2",
    "gpt-image-2.5-sunburst": "gpt-image-2.5",
    "gpt-image-2.5-sunburst-2026-09-08": "gpt-image-2.5",
    "gpt-image-2.5-flare": "gpt-image-2.5",
    "gpt-image-2.5-flare-2026-09-08": "gpt-image-2.5",
    "gpt-image-2.6-sunburst": "gpt-image-2.5",
    "gpt-image-2.6-flare": "gpt-image-2.5",
    "chatgpt-image-latest": "gpt-image-1",
    "gpt-image-1.5": "gpt-image-1",
    "gpt-image-1-mini": "gpt-image-1",
    "gpt-image-1": "gpt-image-1",
    "dall-e-2": "dall-e-2",
    "dall-e-3": "dall-e-3",
}


def registry_with(**changes) -> ModelRegistry:
    """The shipped registry with some keys changed, validated again."""
    return ModelRegistry.model_validate({**REGISTRY.model_dump(), **changes})


def resolve(registry=REGISTRY, **kw):
    return resolve_request(ImageGenerationRequest(**{"prompt": "otter", **kw}), registry)


def refused(param, registry=REGISTRY, **kw):
    with pytest.raises(OpenAIError) as e:
        resolve(registry, **kw)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    return e.value


def test_every_sdk_model_id_is_shipped_with_its_family():
    import openai.types

    assert set(SDK_MODEL_FAMILIES) == set(openai.types.ImageModel.__args__)
    for model_id, family in SDK_MODEL_FAMILIES.items():
        assert REGISTRY.model(model_id).family == family, model_id
    assert REGISTRY.model("embedded-sd") is not None


@pytest.mark.parametrize("model, limit", [("dall-e-2", 1000), ("dall-e-3", 4000), ("gpt-image-1", 32000), ("gpt-image-2", 32000)])
def test_prompt_length(model, limit):
    assert resolve(model=model, prompt="x" * limit, size="1024x1024").user_prompt
    if limit < 32000:  # 32000 is also the protocol's own cap
        refused("prompt", model=model, prompt="x" * (limit + 1))


def test_n():
    assert resolve(model="dall-e-2", n=10).n == 10
    assert resolve(model="gpt-image-1", n=10).n == 10
    refused("n", model="dall-e-3", n=2)


@pytest.mark.parametrize(
    "model, ok, bad",
    [
        ("dall-e-2", ["256x256", "512x512", "1024x1024"], ["1792x1024", "1536x1024", "1024x1536", "768x768"]),
        ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"], ["256x256", "512x512", "1536x1024"]),
        # gpt-image-1, 1-mini, 1.5, chatgpt-image-latest: the three sizes, nothing else.
        ("gpt-image-1", ["1024x1024", "1536x1024", "1024x1536"], ["256x256", "512x512", "1792x1024", "1280x720", "1024x1040"]),
        # gpt-image-2 and later: any WxH, sides multiples of 16, 1:3..3:1, within the pipeline's 1536x1536 pixels.
        (
            "gpt-image-2",
            ["1024x1024", "1536x1024", "1024x1536", "256x256", "1280x720", "1536x864", "512x1536", "1536x512", "1536x1536"],
            ["1000x1000", "100x100", "1024x1032", "1600x400", "400x1600", "2048x2048", "1552x1536"],
        ),
        ("gpt-image-2.5-flare", ["256x256", "1536x864"], ["1000x1000", "1600x400", "2048x2048"]),
    ],
)
def test_sizes(model, ok, bad):
    for size in ok:
        assert resolve(model=model, size=size).size == size
    for size in bad:
        refused("size", model=model, size=size)


@pytest.mark.parametrize(
    "size, cause",
    [
        ("100x100", "multiples of 16"),
        ("1000x1000", "multiples of 16"),
        ("1600x400", "aspect ratio"),
        ("2048x2048", "at most 2359296 pixels"),
    ],
)
def test_one_message_per_size_cause(size, cause):
    message = refused("size", model="gpt-image-2", size=size).message
    assert cause in message and message.count(size) == 1, message
    fixed = refused("size", model="gpt-image-1", size=size).message
    assert "Supported sizes: 1024x1024, 1536x1024, 1024x1536, auto." in fixed and fixed.count(size) == 1, fixed


def test_openai_size_limit_of_the_gpt_image_2_generation():
    """At most 3840x2160: no side over 3840 and no more than 3840*2160 pixels, either way round;
    checked apart from the pipeline's own limit (here set far above it)."""
    rules = FAMILIES["gpt-image-2"]
    big = 10**9
    for w, h in [(3840, 2160), (2160, 3840), (3840, 1280), (2880, 2880)]:
        assert rules.check_free_size(w, h, big) is None, (w, h)
    for w, h in [(3856, 1296), (1296, 3856), (2880, 2896), (3840, 2176)]:
        assert "3840x2160" in rules.check_free_size(w, h, big), (w, h)
    assert "pixels" in rules.check_free_size(3840, 2160, 2048 * 2048)


def test_auto_size_resolves():
    # OpenAI's default for dall-e is 1024x1024, not the pipeline's 512x512.
    assert resolve(model="dall-e-2").size == "1024x1024"
    assert resolve(model="dall-e-2", size="auto").size == "1024x1024"
    assert resolve(model="dall-e-3").size == "1024x1024"
    # gpt-image-1 does not take the pipeline's 512x512: the family's default.
    assert resolve(model="gpt-image-1", size="auto").size == "1024x1024"
    # gpt-image-2 takes it.
    assert resolve(model="gpt-image-2", size="auto").size == "512x512"
    assert resolve(model="embedded-sd").size == "512x512"


def test_a_model_entrys_default_size_wins():
    models = [m.model_dump() for m in REGISTRY.models]
    for m in models:
        if m["id"] in ("dall-e-2", "gpt-image-2"):
            m["default_size"] = "256x256"
    registry = registry_with(models=models)
    assert resolve(registry, model="dall-e-2").size == "256x256"
    assert resolve(registry, model="gpt-image-2", size="auto").size == "256x256"


@pytest.mark.parametrize("model_id", [m.id for m in REGISTRY.models])
def test_the_default_size_is_one_the_model_advertises(model_id):
    model = REGISTRY.model(model_id)
    pipeline = REGISTRY.pipelines[model.pipeline]
    assert resolve(model=model_id).size == default_size(model, pipeline)
    assert default_size(model, pipeline) in served_sizes(model, pipeline)


def test_qualities():
    assert resolve(model="dall-e-2", quality="standard").quality == "standard"
    refused("quality", model="dall-e-2", quality="hd")
    assert resolve(model="dall-e-3", quality="hd", size="1024x1024").steps > resolve(model="dall-e-3", quality="standard").steps
    refused("quality", model="dall-e-3", quality="low")
    refused("quality", model="gpt-image-1", quality="standard")
    low, med, high = (resolve(model="gpt-image-1", quality=q) for q in ("low", "medium", "high"))
    assert low.steps < med.steps < high.steps
    assert resolve(model="gpt-image-1", quality="auto").quality == "medium"
    # xhigh and max: the 2.5 and 2.6 models only, derived as 3x and 4x the pipeline's steps.
    for model in ("gpt-image-2.5-sunburst", "gpt-image-2.5-flare-2026-09-08", "gpt-image-2.6-flare"):
        assert resolve(model=model, quality="xhigh").steps == 3 * DEFAULT_STEPS
        assert resolve(model=model, quality="max").steps == 4 * DEFAULT_STEPS
    for model in ("gpt-image-1", "gpt-image-1.5", "chatgpt-image-latest", "gpt-image-2", "embedded-sd"):
        refused("quality", model=model, quality="xhigh")
        refused("quality", model=model, quality="max")


def test_style():
    vivid = resolve(model="dall-e-3", size="1024x1024")
    natural = resolve(model="dall-e-3", size="1024x1024", style="natural")
    assert vivid.guidance > natural.guidance
    # The shipped styles add no words (the embedded model knows only its
    # scenes'); a dall-e-3 entry without `styles` gets the built-in presets,
    # whose vivid template does.
    assert vivid.prompt == natural.prompt == "otter"
    models = [{k: v for k, v in m.items() if k != "styles"} for m in REGISTRY.model_dump()["models"]]
    built_in = registry_with(models=models)
    vivid = resolve(built_in, model="dall-e-3", size="1024x1024")
    natural = resolve(built_in, model="dall-e-3", size="1024x1024", style="natural")
    assert vivid.guidance > natural.guidance
    assert vivid.prompt != "otter" and "otter" in vivid.prompt and natural.prompt == "otter"
    assert "style" in resolve(model="dall-e-2", style="vivid").ignored
    assert "style" in resolve(model="gpt-image-1", style="natural").ignored


def test_response_format_defaults():
    assert resolve(model="dall-e-2").response_format == "url"
    assert resolve(model="dall-e-3").response_format == "url"
    assert resolve(model="gpt-image-1").response_format == "b64_json"
    assert resolve(model="gpt-image-1", response_format="url").response_format == "url"


def test_gpt_image_params_are_ignored_elsewhere_but_streaming_is_not():
    r = resolve(model="dall-e-2", output_format="jpeg", output_compression=50, background="opaque", moderation="low", stream=True, partial_images=2)
    assert r.ignored == sorted(["output_format", "output_compression", "background", "moderation"])
    assert r.output_format == "png" and r.stream and r.partial_images == 2
    d3 = resolve(model="dall-e-3", stream=True)
    assert d3.stream and d3.partial_images == 0 and d3.ignored == []
    assert "partial_images" in resolve(model="dall-e-3", partial_images=1).ignored  # means nothing without a stream


def test_no_model_goes_to_gpt_image_default_when_a_gpt_param_is_used():
    assert resolve().model.id == "dall-e-2"
    for kw in ({"background": "opaque"}, {"moderation": "low"}, {"output_format": "webp"}, {"output_compression": 5}, {"stream": False}, {"partial_images": 0}):
        assert resolve(**kw).model.id == "gpt-image-2", kw


def test_background():
    refused("background", model="gpt-image-1", background="transparent", output_format="jpeg")
    t = resolve(model="gpt-image-1", background="transparent")
    assert t.background == "transparent" and t.prompt != "otter"
    assert resolve(model="gpt-image-1", background="auto").background == "opaque"
    assert resolve(model="gpt-image-1", background="transparent", output_format="webp").output_format == "webp"


def test_unknown_model_without_and_with_a_fallback():
    e = refused("model", model="image")
    assert e.code == "model_not_found" and "GET /v1/models" in e.message
    registry = registry_with(fallback_model="gpt-image-2")
    for name in ("image", "random"):
        r = resolve(registry, model=name, size="1536x864")
        assert r.model.id == "gpt-image-2" and r.size == "1536x864"
    # The fallback's own rules apply.
    refused("size", registry_with(fallback_model="dall-e-3"), model="image", size="256x256")
    # Listed ids are not affected.
    assert resolve(registry, model="dall-e-3").model.id == "dall-e-3"
    with pytest.raises(ValidationError, match="fallback_model"):
        registry_with(fallback_model="no-such-model")


def test_legacy_gpt_image_family_keeps_what_it_accepted():
    models = [*(m.model_dump() for m in REGISTRY.models), {"id": "old", "pipeline": "embedded-sd", "family": "gpt-image"}]
    registry = registry_with(models=models)
    assert registry.model("old").family == "gpt-image-2.5"
    assert resolve(registry, model="old", size="1280x720", quality="xhigh").steps == 3 * DEFAULT_STEPS


def test_svg_and_gif():
    e = refused("output_format", model="gpt-image-2", output_format="gif")
    assert "gif" in e.message and "not supported" in e.message
    svg = resolve(model="gpt-image-2", output_format="svg", output_compression=50)
    assert svg.output_format == "svg" and "output_compression" in svg.ignored
    refused("n", model="gpt-image-2", output_format="svg", n=2)
    refused("stream", model="gpt-image-2", output_format="svg", stream=True)
    # dall-e does not use output_format: ignored, as before.
    assert resolve(model="dall-e-2", output_format="svg").output_format == "png"


def test_current_sdk_parameters():
    assert "complexity" in resolve(model="gpt-image-1", complexity="high").ignored
    r = resolve(model="gpt-image-1", safety_identifier="sid", user="u")
    assert r.end_user == "sid"
    assert resolve(model="gpt-image-1", user="u").end_user == "u"
    assert "frame_count" in resolve(model="gpt-image-1", frame_count=4).ignored


def test_unknown_fields_are_reported_as_ignored():
    assert "foo" in resolve(model="gpt-image-1", foo=1).ignored


@pytest.mark.parametrize(
    "size, expected",
    [("1024x1024", (272, 1056, 4160)), ("1024x1536", (408, 1584, 6240)), ("1536x1024", (400, 1568, 6208))],
)
def test_output_tokens_match_openai_table(size, expected):
    w, h = map(int, size.split("x"))
    assert tuple(output_tokens(w, h, q) for q in ("low", "medium", "high")) == expected
    assert output_tokens(w, h, "xhigh") == output_tokens(w, h, "max") == expected[2]


def test_preview_steps_are_evenly_spaced_and_before_the_end():
    assert preview_steps(8, 2) == [3, 5]
    assert preview_steps(4, 3) == [1, 2, 3]
    assert preview_steps(4, 0) == []
    assert preview_steps(2, 3) == [1]
