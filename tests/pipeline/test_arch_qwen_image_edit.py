"""Qwen-Image-Edit and Edit-Plus through their architectures' stage
methods, on tiny models, against diffusers' own QwenImageEditPipeline and
QwenImageEditPlusPipeline. Each edit encodes its inputs at about a
megapixel (diffusers' fixed size), so each reference run is done once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serve_app.pipeline.architectures.qwen_image import (
    QwenImageEditArchitecture,
    QwenImageEditPlusArchitecture,
    qwen2_vl_processor,
)
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob, EditsUnsupported
from tests.pipeline.stage_checks import Stages, assert_not_flat, max_diff, one_torch_thread, pipeline_pixels  # noqa: F401 (one_torch_thread: autouse)

PROMPT = "make the cat blue"
# The output is not the input's size or aspect: the references keep the input's.
HEIGHT, WIDTH = 64, 128


def smooth_image(height: int, width: int, shift: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(xx * 2 + shift) % 256, yy * 3, (xx + yy) % 256], -1).astype(np.uint8)


def reference(pipeline_class, model_dir, stages, image, seed: int) -> np.ndarray:
    """diffusers' own edit pipeline, given our processor (transformers' own,
    built without its torchvision video part), as uint8."""
    pipe = pipeline_class.from_pretrained(
        str(model_dir), processor=qwen2_vl_processor(PipelineLayout.read(model_dir), stages.text.text_pipe.tokenizer)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipeline_pixels(
        pipe, [seed], image=image, prompt=PROMPT, negative_prompt="", true_cfg_scale=4.0, height=HEIGHT, width=WIDTH,
        num_inference_steps=2,
    )


@pytest.fixture(scope="module")
def edit(tiny_model_dir):
    model_dir = tiny_model_dir("tiny-qwen-image-edit")
    stages = Stages(QwenImageEditArchitecture, model_dir)
    pixels = smooth_image(64, 96)
    emb = stages.text.encode(PROMPT, images=[pixels])
    latents = stages.vae.encode_image(pixels, references=[pixels])
    return model_dir, stages, pixels, emb, latents


def test_edit_matches_diffusers(edit):
    model_dir, stages, pixels, emb, latents = edit
    # The reference is the input at about a megapixel with its 3:2 aspect (1248x832), in 16-channel latents.
    assert [r.shape for r in latents.references] == [(1, 16, 832 // 8, 1248 // 8)]
    assert latents.mean is None
    job = DenoiseJob(emb, [3], HEIGHT, WIDTH, steps=2, guidance=4.0, edit=latents)
    assert stages.denoiser.steps_for(job) == 2  # starts from noise: the whole schedule
    ours = stages.generate(job)
    ref = reference(__import__("diffusers").QwenImageEditPipeline, model_dir, stages, Image.fromarray(pixels), 3)
    assert ours.shape == (1, HEIGHT, WIDTH, 3)
    assert_not_flat(ours)
    assert max_diff(ours, ref) <= 1


def test_the_image_reaches_the_text_encoder_and_the_denoiser(edit):
    _, stages, pixels, emb, latents = edit
    other = smooth_image(64, 96, shift=100)
    other_emb = stages.text.encode(PROMPT, images=[other])
    assert np.abs(other_emb.prompt_embeds - emb.prompt_embeds).max() > 1e-4
    job = DenoiseJob(emb, [3], HEIGHT, WIDTH, 2, 4.0, edit=latents)
    swapped = latents.references[0][..., ::-1].copy()
    moved = DenoiseJob(emb, [3], HEIGHT, WIDTH, 2, 4.0, edit=type(latents)(references=[swapped]))
    assert np.abs(stages.latents([job])[-1][1] - stages.latents([moved])[-1][1]).max() > 1e-4


def test_batch_of_two_edits_gives_each_its_own_image_and_previews(edit):
    _, stages, pixels, emb, latents = edit
    a = DenoiseJob(emb, [5], HEIGHT, WIDTH, 2, 4.0, edit=latents)
    b = DenoiseJob(stages.text.encode("a hat on the cat", images=[pixels]), [6, 7], HEIGHT, WIDTH, 2, 4.0, edit=latents)
    assert a.batch_key() == b.batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert np.abs(together - alone).max() < 1e-4
    events = stages.latents([a], preview_steps={1})
    assert [k for k, _ in events] == ["preview", "final"] and events[0][1].shape == events[1][1].shape


def test_edit_rules(edit):
    _, stages, pixels, emb, latents = edit
    assert QwenImageEditArchitecture.edit_inputs.max_images == 1
    with pytest.raises(EditsUnsupported, match="mask"):
        stages.vae.encode_image(pixels, np.zeros(pixels.shape[:2], np.uint8), references=[pixels])
    with pytest.raises(ValueError, match="cannot generate from text alone"):
        stages.latents([DenoiseJob(emb, [1], HEIGHT, WIDTH, 1, 4.0)])
    assert stages.text.probe_text() and stages.denoiser.probe_denoiser() and stages.vae.probe_vae()


def test_edit_plus_takes_several_images_and_matches_diffusers(tiny_model_dir):
    from diffusers import QwenImageEditPlusPipeline

    model_dir = tiny_model_dir("tiny-qwen-image-edit-plus")
    stages = Stages(QwenImageEditPlusArchitecture, model_dir)
    images = [smooth_image(64, 64), smooth_image(32, 64, shift=50)]
    latents = stages.vae.encode_image(images[0], references=images)
    assert [r.shape for r in latents.references] == [(1, 16, 128, 128), (1, 16, 736 // 8, 1440 // 8)]  # 2:1 at about 1024x1024 pixels, sides multiples of 32
    job = DenoiseJob(stages.text.encode(PROMPT, images=images), [4], HEIGHT, WIDTH, 2, 4.0, edit=latents)
    ours = stages.generate(job)
    ref = reference(QwenImageEditPlusPipeline, model_dir, stages, [Image.fromarray(i) for i in images], 4)
    assert_not_flat(ours)
    assert max_diff(ours, ref) <= 1
