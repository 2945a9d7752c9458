"""Z-Image through ZImageArchitecture's stage methods, on the tiny model,
against diffusers' own ZImagePipeline, ZImageImg2ImgPipeline and
ZImageInpaintPipeline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serve_app.pipeline.architectures.z_image import ZImageArchitecture
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob
from tests.pipeline.stage_checks import Stages, assert_not_flat, max_diff, one_torch_thread, pipeline_pixels  # noqa: F401 (one_torch_thread: autouse)

PROMPT = "a photo of a red cat on the sea"
# Not square, so that a height/width mix-up in the latent grid or RoPE shows.
HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("tiny-z-image")


@pytest.fixture(scope="module")
def stages(model_dir):
    return Stages(ZImageArchitecture, model_dir)


def diffusers_pipe(pipeline_class, model_dir):
    pipe = pipeline_class.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, seeds, steps, **kwargs) -> np.ndarray:
    return pipeline_pixels(
        pipe, seeds, prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, num_images_per_prompt=len(seeds), **kwargs
    )


def test_matches_diffusers_without_guidance_and_with(stages, model_dir):
    from diffusers import ZImagePipeline

    pipe = diffusers_pipe(ZImagePipeline, model_dir)
    emb = stages.text.encode(PROMPT)
    # Ragged: as long as the templated prompt, not a padded window; the empty negative prompt is shorter.
    assert emb.prompt_embeds.shape[0] == 1 and emb.prompt_embeds.shape[2] == 32
    assert emb.negative_prompt_embeds.shape[1] < emb.prompt_embeds.shape[1] < 512

    # Turbo's settings: no guidance. Two seeds, each its own image.
    turbo = stages.generate(DenoiseJob(emb, seeds=[3, 4], height=HEIGHT, width=WIDTH, steps=2, guidance=0.0))
    assert turbo.shape == (2, HEIGHT, WIDTH, 3) and turbo.dtype == np.uint8
    assert_not_flat(turbo)
    assert not np.array_equal(turbo[0], turbo[1])
    assert max_diff(turbo, reference(pipe, [3, 4], 2, guidance_scale=0.0)) == 0

    # The base model's: guidance 3 (a second pass with the empty negative prompt).
    guided = stages.generate(DenoiseJob(emb, seeds=[3], height=HEIGHT, width=WIDTH, steps=2, guidance=3.0))
    assert max_diff(guided, reference(pipe, [3], 2, guidance_scale=3.0)) == 0
    # Guidance reaches the latents (random weights make its effect on pixels small).
    guided_latents = stages.latents([DenoiseJob(emb, [3], HEIGHT, WIDTH, 2, 3.0)])[-1][1]
    unguided_latents = stages.latents([DenoiseJob(emb, [3], HEIGHT, WIDTH, 2, 0.0)])[-1][1]
    assert np.abs(guided_latents - unguided_latents).max() > 1e-2


def test_img2img_and_inpaint_match_diffusers(stages, model_dir):
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    rng = np.random.default_rng(0)
    pixels = (rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    emb = stages.text.encode(PROMPT)

    # Strength 0.6 of 4 steps runs the last 3 (SD3's rounding, which Z-Image's img2img copies).
    job = DenoiseJob(emb, [5], HEIGHT, WIDTH, 4, 0.0, edit=stages.vae.encode_image(pixels), strength=0.6)
    assert stages.denoiser.steps_for(job) == 3
    ours = stages.generate(job)
    ref = reference(diffusers_pipe(ZImageImg2ImgPipeline, model_dir), [5], 4, image=Image.fromarray(pixels), strength=0.6, guidance_scale=0.0)
    assert_not_flat(ours)
    assert max_diff(ours, ref) == 0

    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, 32:80] = 0  # OpenAI's mask: alpha 0 is where to edit
    edit = stages.vae.encode_image(pixels, alpha)
    assert edit.mask.shape == (1, 1, HEIGHT // 8, WIDTH // 8) and 0 < edit.mask.mean() < 1
    ours = stages.generate(DenoiseJob(emb, [6], HEIGHT, WIDTH, 4, 0.0, edit=edit, strength=0.8))
    repaint = Image.fromarray(((alpha < 128) * 255).astype(np.uint8))
    ref = reference(
        diffusers_pipe(ZImageInpaintPipeline, model_dir), [6], 4,
        image=Image.fromarray(pixels), mask_image=repaint, strength=0.8, guidance_scale=0.0,
    )
    # The latents agree to about 1e-6; a pixel may round the other way.
    assert max_diff(ours, ref) <= 1


def test_batch_of_prompts_of_different_lengths_gives_each_its_own_images(stages):
    a = DenoiseJob(stages.text.encode("a red cat"), [11], HEIGHT, WIDTH, 2, 3.0)
    b = DenoiseJob(stages.text.encode("a blue dog in the deep sea, in the rain, " * 3), [12, 13], HEIGHT, WIDTH, 2, 3.0)
    # Different lengths even after the transformer pads each caption to a multiple of 32.
    assert a.embeddings.prompt_embeds.shape[1] // 32 != b.embeddings.prompt_embeds.shape[1] // 32
    assert a.batch_key() == b.batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert together.shape == (3, 16, HEIGHT // 8, WIDTH // 8)
    assert np.abs(together - alone).max() < 1e-4
    assert max_diff(stages.vae.decode(together), stages.vae.decode(alone)) <= 1


def test_previews_come_before_final_and_approach_it(stages):
    job = DenoiseJob(stages.text.encode(PROMPT), [7], HEIGHT, WIDTH, 3, 0.0)
    events = stages.latents([job], preview_steps={1, 2, 3})
    assert [k for k, _ in events] == ["preview", "preview", "final"]  # never a preview at the last step
    final = stages.vae.decode(events[-1][1])
    # With the model output's sign wrong (x_t + sigma * v) the estimates would move away from the result.
    distances = [np.abs(stages.vae.decode(latents).astype(float) - final).mean() for _, latents in events[:-1]]
    assert distances[0] > distances[1] > 0

    # A "step" event after every step: where the stage checks for cancellation.
    kinds = [k for k, _ in stages.denoiser.denoise([job], {2}, every_step=True)]
    assert kinds == ["step", "preview", "step", "step", "final"]


def test_token_count_and_truncation_keep_the_clients_text(stages):
    text = stages.text
    tokenizer = text.text_pipe.tokenizer
    short = text.encode("A red cat!", count_prompt="cat")
    assert (short.truncated, short.encoded_prompt) == (False, "A red cat!")
    assert short.token_count == len(tokenizer("cat").input_ids) == 2  # byte-level with the merge "at": c, at
    # The window is 512 templated tokens less the user turn's header (<|im_start|>, "user", newline).
    assert text.prompt_window == 512 - len(tokenizer("<|im_start|>user\n").input_ids)

    long = "Zebra, quokka and the otter. " * 30
    e = text.encode(long)
    assert e.token_count == len(tokenizer(long).input_ids) > text.prompt_window
    assert e.truncated and long.startswith(e.encoded_prompt) and len(e.encoded_prompt) < len(long)
    assert len(tokenizer(e.encoded_prompt).input_ids) <= text.prompt_window
    # diffusers cut the templated text at 512 tokens: the embeddings are the whole window.
    assert e.prompt_embeds.shape[1] == 512


def test_probes_size_rule_and_generic_stages(model_dir, stages):
    from serve_app.pipeline.architectures import architecture_for
    from serve_app.pipeline.denoise import LatentDenoiser

    assert stages.text.probe_text() and stages.denoiser.probe_denoiser() and stages.vae.probe_vae()
    with pytest.raises(ValueError, match="divides by 16"):
        stages.latents([DenoiseJob(stages.text.encode(PROMPT), [1], 72, 64, 1, 0.0)])
    layout = PipelineLayout.read(model_dir)
    assert architecture_for(layout) is ZImageArchitecture
    job = DenoiseJob(stages.text.encode(PROMPT), [3], HEIGHT, WIDTH, 2, 0.0)
    assert np.array_equal(LatentDenoiser(layout).denoise(job), stages.latents([job])[-1][1])
