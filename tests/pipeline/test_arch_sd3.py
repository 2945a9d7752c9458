"""Stable Diffusion 3 on our three stages (SD3Architecture), against
diffusers' own StableDiffusion3 pipelines on the tiny SD3 model."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.architectures.sd3 import SD3Architecture
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob
from tests.pipeline.stage_checks import Stages, max_diff, one_torch_thread  # noqa: F401 (one_torch_thread: autouse)

PROMPT = "a cute baby sea otter in the city at dusk"
# Not square, so that a height/width mix-up shows: 8x12 latents, 4x6 patches.
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("tiny-sd3")


@pytest.fixture(scope="module")
def stages(model_dir):
    """One architecture object per stage, each loading only its own part, as the deployments do."""
    held = Stages(SD3Architecture, model_dir)
    return held.text, held.denoiser, held.vae


@pytest.fixture(scope="module")
def reference(model_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(model_dir))


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def denoise_all(denoiser, jobs, preview_steps=frozenset()):
    events = list(denoiser.denoise(jobs, set(preview_steps), every_step=False))
    assert events[-1][0] == "final"
    return events


def test_loads_from_model_index_and_each_stage_loads_only_its_part(model_dir, stages):
    layout = PipelineLayout.read(model_dir)
    assert architecture_for(layout) is SD3Architecture
    text, denoiser, vae = stages
    assert not hasattr(text, "transformer") and not hasattr(text, "vae")
    assert not hasattr(denoiser, "text_pipe") and not hasattr(denoiser, "vae")
    assert not hasattr(vae, "text_pipe") and not hasattr(vae, "transformer")


def test_probes(stages):
    text, denoiser, vae = stages
    assert text.probe_text() and denoiser.probe_denoiser() and vae.probe_vae()


@pytest.mark.parametrize("guidance, negative", [(5.0, "blurry, low quality"), (1.0, "")])
def test_same_pixels_and_previews_as_diffusers(stages, reference, guidance, negative):
    """Two images, one generator each, through our stages and through
    StableDiffusion3Pipeline.__call__. The previews are checked against the
    clean-image estimate recovered from diffusers' own per-step latents:
    with Euler, x_next = x + (s_next - s) v, so v and x0 = x - s v follow."""
    text, denoiser, vae = stages
    seeds, steps = [11, 12], 3
    emb = text.encode(PROMPT, negative_prompt=negative)
    events = denoise_all(denoiser, [DenoiseJob(emb, seeds, HEIGHT, WIDTH, steps, guidance)], preview_steps={1, 2, 3})
    ours = vae.decode(events[-1][1])

    seen = []

    def keep_latents(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    expected = reference(
        PROMPT,
        negative_prompt=negative,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=len(seeds),
        generator=generators(seeds),
        output_type="pil",
        callback_on_step_end=keep_latents,
    ).images
    expected = np.stack([np.array(im) for im in expected])
    diff = max_diff(ours, expected)
    print(f"max pixel difference vs StableDiffusion3Pipeline (guidance {guidance}): {diff}")
    assert ours.shape == (2, HEIGHT, WIDTH, 3) and diff <= 1
    assert max_diff(ours[0], ours[1]) > 10  # two seeds, two images

    # Previews after steps 1 and 2 (never after the last), before the final.
    assert [kind for kind, _ in events] == ["preview", "preview", "final"]
    sigmas = reference.scheduler.sigmas
    x1, x2 = seen[0], seen[1]  # latents after steps 1 and 2
    velocity = (x2 - x1) / (sigmas[2] - sigmas[1])
    x0 = (x1 - sigmas[1] * velocity).numpy()
    np.testing.assert_allclose(events[1][1], x0, atol=2e-4)
    assert np.abs(events[1][1] - events[-1][1]).max() > 1e-3  # an estimate, not the final


def test_an_image_depends_only_on_its_seed_not_its_batch(stages):
    text, denoiser, vae = stages
    a = DenoiseJob(text.encode("a red cat"), [3], HEIGHT, WIDTH, 2, 4.0)
    b = DenoiseJob(text.encode("a blue dog with light"), [4, 5], HEIGHT, WIDTH, 2, 4.0)
    assert a.batch_key() == b.batch_key()
    together = denoise_all(denoiser, [a, b])[-1][1]
    alone_a = denoise_all(denoiser, [a])[-1][1]
    alone_b = denoise_all(denoiser, [b])[-1][1]
    np.testing.assert_allclose(together, np.concatenate([alone_a, alone_b]), atol=1e-4)
    assert max_diff(vae.decode(together), vae.decode(np.concatenate([alone_a, alone_b]))) <= 1
    # The prompts reached their own images: b's first image differs from a's.
    assert np.abs(together[0] - together[1]).max() > 1e-2


def test_token_count_and_truncation_at_the_t5_window(stages):
    text = stages[0]
    tokenizer = text.text_pipe.tokenizer_3
    window = text.max_sequence_length - 1  # T5 adds its end token

    def tokens(s):
        return len(tokenizer(s, add_special_tokens=False).input_ids)

    short = text.encode("A cute baby sea otter!")
    assert short.token_count == tokens("A cute baby sea otter!") and not short.truncated
    assert short.encoded_prompt == "A cute baby sea otter!"
    templated = text.encode("photo of a cat, dramatic", count_prompt="a cat")
    assert templated.token_count == tokens("a cat")

    prompt = "A City at Dusk, with Flying Cars; vivid colors -- DRAMATIC lighting! " * 12
    emb = text.encode(prompt)
    assert emb.token_count == tokens(prompt) > window and emb.truncated
    # The prompt as the client wrote it (case, punctuation, spacing), cut at
    # a character where the window's last token ends.
    kept = emb.encoded_prompt
    assert prompt.startswith(kept) and len(kept) < len(prompt)
    assert tokens(kept) == window
    assert tokens(prompt[: len(kept) + 1]) > window or prompt[len(kept)] == " "
    assert emb.prompt_embeds.shape == (1, 77 + text.max_sequence_length, 96)
    assert emb.pooled_prompt_embeds.shape == (1, 64)


@pytest.fixture(scope="module")
def edit_input():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, : WIDTH // 2] = 0  # OpenAI's mask: alpha 0 = edit the left half
    return pixels, alpha


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_same_pixels_as_diffusers(stages, reference, edit_input, strength):
    from diffusers import StableDiffusion3Img2ImgPipeline

    text, denoiser, vae = stages
    pixels, _ = edit_input
    seeds, steps = [21, 22], 4
    job = DenoiseJob(text.encode(PROMPT), seeds, HEIGHT, WIDTH, steps, 5.0, edit=vae.encode_image(pixels), strength=strength)
    events = denoise_all(denoiser, [job])
    # 4 steps at 0.6: SD3 runs int(4 - 2.4) = 1 -> 3 steps (SD's rule would give 2).
    assert denoiser.steps_for(job) == {0.6: 3, 1.0: 4}[strength]
    ours = vae.decode(events[-1][1])

    pipe = StableDiffusion3Img2ImgPipeline.from_pipe(reference)
    image = PIL.Image.fromarray(pixels)
    # One input per image, so that diffusers samples each image's latents
    # from that image's own generator, as we do.
    expected = pipe(
        PROMPT,
        image=[image] * len(seeds),
        strength=strength,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=5.0,
        num_images_per_prompt=len(seeds),
        generator=generators(seeds),
    ).images
    diff = max_diff(ours, np.stack([np.array(im) for im in expected]))
    print(f"img2img strength {strength}: max pixel difference {diff}")
    assert diff <= 1


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_inpaint_same_latents_as_diffusers(stages, reference, edit_input, strength):
    """Compared in latents: diffusers 0.42's StableDiffusion3InpaintPipeline
    decodes without adding the VAE's shift_factor, unlike its own encode and
    every other SD3 pipeline (huggingface/diffusers#13611, issue 1). Our
    pixels are compared with its latents decoded the way the text-to-image
    pipeline decodes."""
    from diffusers import StableDiffusion3InpaintPipeline

    text, denoiser, vae = stages
    pixels, alpha = edit_input
    seeds, steps = [31, 32], 4  # at 0.5, the last 2 of 4 steps
    edit = vae.encode_image(pixels, alpha)
    assert edit.inpaint and edit.mask.shape == (1, 1, HEIGHT // 8, WIDTH // 8)
    job = DenoiseJob(text.encode(PROMPT), seeds, HEIGHT, WIDTH, steps, 5.0, edit=edit, strength=strength)
    events = denoise_all(denoiser, [job], preview_steps={1})
    ours = events[-1][1]

    pipe = StableDiffusion3InpaintPipeline.from_pipe(reference)
    mask = PIL.Image.fromarray(((alpha < 128) * 255).astype(np.uint8))  # diffusers: white = repaint
    expected = pipe(
        PROMPT,
        image=[PIL.Image.fromarray(pixels)] * len(seeds),  # one per image, as in the img2img test
        mask_image=[mask] * len(seeds),
        strength=strength,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=5.0,
        num_images_per_prompt=len(seeds),
        generator=generators(seeds),
        output_type="latent",
    ).images.numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    config = reference.vae.config
    with torch.inference_mode():
        decoded = reference.vae.decode(torch.from_numpy(expected) / config.scaling_factor + config.shift_factor).sample
    decoded = reference.image_processor.postprocess(decoded, output_type="pil")
    diff = max_diff(vae.decode(ours), np.stack([np.array(im) for im in decoded]))
    off = np.abs(ours - expected)
    print(f"inpaint {strength}: max latent difference {off.max():.2e} (repainted {off[..., : WIDTH // 16].max():.2e}), pixels {diff}")
    assert diff <= 1
    # The kept (right) half of the preview is the input's own latents.
    preview = events[0][1]
    assert events[0][0] == "preview"
    np.testing.assert_allclose(preview[..., WIDTH // 16 :], ours[..., WIDTH // 16 :], atol=1e-5)
    assert np.abs(preview[..., : WIDTH // 16] - ours[..., : WIDTH // 16]).max() > 1e-3


def test_dynamic_shift_same_pixels_as_diffusers(model_dir, tmp_path):
    """A scheduler configured for resolution-dependent shifting (mu from the
    image's token count, as FLUX and some SD3 fine-tunes use)."""
    import json
    import shutil

    from diffusers import StableDiffusion3Pipeline

    shifted = tmp_path / "shifted"
    shutil.copytree(model_dir, shifted)
    config_path = shifted / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    config_path.write_text(json.dumps(config))
    layout = PipelineLayout.read(shifted)
    arch = SD3Architecture(layout)
    arch.load_text()
    arch.load_denoiser()
    arch.load_vae()
    seeds = [41, 42]
    job = DenoiseJob(arch.encode(PROMPT), seeds, HEIGHT, WIDTH, 2, 1.0)
    ours = arch.decode(denoise_all(arch, [job])[-1][1])
    expected = StableDiffusion3Pipeline.from_pretrained(str(shifted))(
        PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        guidance_scale=1.0,
        num_images_per_prompt=2,
        generator=generators(seeds),
    ).images
    assert max_diff(ours, np.stack([np.array(im) for im in expected])) <= 1
