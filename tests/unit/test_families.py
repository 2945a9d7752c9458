"""The model-family rules, one case per table cell that can fail, on the resolver alone."""

from __future__ import annotations

import pytest

from serve_app.config import load_registry
from serve_app.errors import OpenAIError
from serve_app.families import output_tokens
from serve_app.generation import preview_steps, resolve_request
from serve_app.protocol import ImageGenerationRequest

REGISTRY = load_registry("configs/models.yaml")


def resolve(**kw):
    return resolve_request(ImageGenerationRequest(**{"prompt": "otter", **kw}), REGISTRY)


def refused(param, **kw):
    with pytest.raises(OpenAIError) as e:
        resolve(**kw)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    return e.value


@pytest.mark.parametrize("model, limit", [("dall-e-2", 1000), ("dall-e-3", 4000), ("gpt-image-1", 32000)])
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
        ("dall-e-2", ["256x256", "512x512", "1024x1024"], ["1792x1024", "1536x1024", "768x768"]),
        ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"], ["512x512", "1536x1024"]),
        ("gpt-image-1", ["1024x1024", "1536x1024", "1024x1536", "1280x720", "512x1536"], ["1000x1000", "1600x400", "2048x2048"]),
    ],
)
def test_sizes(model, ok, bad):
    for size in ok:
        assert resolve(model=model, size=size).size == size
    for size in bad:
        refused("size", model=model, size=size)


def test_auto_size_resolves():
    assert resolve(model="dall-e-2", size="auto").size == "512x512"  # pipeline default, allowed for dall-e-2
    assert resolve(model="dall-e-3").size == "1024x1024"  # 512 is not a dall-e-3 size: the family's default
    assert resolve(model="gpt-image-1", size="auto").size == "512x512"


def test_qualities():
    assert resolve(model="dall-e-2", quality="standard").quality == "standard"
    refused("quality", model="dall-e-2", quality="hd")
    assert resolve(model="dall-e-3", quality="hd", size="1024x1024").steps > resolve(model="dall-e-3", quality="standard").steps
    refused("quality", model="dall-e-3", quality="low")
    refused("quality", model="gpt-image-1", quality="standard")
    low, med, high = (resolve(model="gpt-image-1", quality=q) for q in ("low", "medium", "high"))
    assert low.steps < med.steps < high.steps
    assert resolve(model="gpt-image-1", quality="auto").quality == "medium"
    assert resolve(model="gpt-image-1", quality="xhigh").steps == 12
    assert resolve(model="gpt-image-1", quality="max").steps == 16
    refused("quality", model="tiny-sd", quality="xhigh")  # tier not configured for this model


def test_style():
    vivid = resolve(model="dall-e-3", size="1024x1024")
    natural = resolve(model="dall-e-3", size="1024x1024", style="natural")
    assert vivid.guidance != natural.guidance
    assert vivid.prompt != "otter" and "otter" in vivid.prompt and natural.prompt == "otter"
    assert "style" in resolve(model="dall-e-2", style="vivid").ignored
    assert "style" in resolve(model="gpt-image-1", style="natural").ignored


def test_response_format_defaults():
    assert resolve(model="dall-e-2").response_format == "url"
    assert resolve(model="dall-e-3").response_format == "url"
    assert resolve(model="gpt-image-1").response_format == "b64_json"
    assert resolve(model="gpt-image-1", response_format="url").response_format == "url"


def test_gpt_image_params_are_ignored_elsewhere():
    r = resolve(model="dall-e-2", output_format="jpeg", output_compression=50, background="opaque", moderation="low", stream=True, partial_images=2)
    assert r.ignored == sorted(["output_format", "output_compression", "background", "moderation", "stream", "partial_images"])
    assert r.output_format == "png" and not r.stream


def test_no_model_goes_to_gpt_image_default_when_a_gpt_param_is_used():
    assert resolve().model.id == "dall-e-2"
    for kw in ({"background": "opaque"}, {"moderation": "low"}, {"output_format": "webp"}, {"output_compression": 5}, {"stream": False}, {"partial_images": 0}):
        assert resolve(**kw).model.id == "gpt-image-1", kw


def test_background():
    refused("background", model="gpt-image-1", background="transparent", output_format="jpeg")
    t = resolve(model="gpt-image-1", background="transparent")
    assert t.background == "transparent" and t.prompt != "otter"
    assert resolve(model="gpt-image-1", background="auto").background == "opaque"
    assert resolve(model="gpt-image-1", background="transparent", output_format="webp").output_format == "webp"


def test_current_sdk_parameters():
    for fmt in ("gif", "svg"):
        e = refused("output_format", model="gpt-image-1", output_format=fmt)
        assert "not supported" in e.message
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
