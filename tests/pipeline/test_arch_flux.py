"""FLUX.1 dev and schnell through FluxArchitecture's stage methods, on tiny
models, against diffusers' own FluxPipeline / FluxImg2ImgPipeline."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from PIL import Image

from serve_app.pipeline.architectures.flux import FluxArchitecture
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob
from tests.pipeline.stage_checks import Stages, assert_not_flat, max_diff, pipeline_pixels

PROMPT = "a photo of a red cat on the sea"
# Not square, so that a height/width mix-up in packing or ids shows.
HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module", params=["tiny-flux-dev", "tiny-flux-schnell"])
def flux(request, tiny_model_dir):
    model_dir = tiny_model_dir(request.param)
    return request.param, model_dir, Stages(FluxArchitecture, model_dir)


def reference(pipeline_class, flux, seeds, steps, **kwargs) -> np.ndarray:
    """diffusers' own pipeline on the same model, one CPU generator per image,
    its output as the uint8 its PIL output would hold."""
    _, model_dir, stages = flux
    pipe = pipeline_class.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipeline_pixels(
        pipe,
        seeds,
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=3.5,
        num_images_per_prompt=len(seeds),
        max_sequence_length=stages.text.t5_window,
        **kwargs,
    )


def test_matches_diffusers_two_images_per_image_seeds(flux):
    kind, _, stages = flux
    emb = stages.text.encode(PROMPT)
    job = DenoiseJob(emb, seeds=[3, 4], height=HEIGHT, width=WIDTH, steps=3, guidance=3.5)
    ours = stages.generate(job)
    ref = reference(FluxPipeline, flux, seeds=[3, 4], steps=3)
    assert ours.shape == (2, HEIGHT, WIDTH, 3) and ours.dtype == np.uint8
    assert_not_flat(ours)
    assert not np.array_equal(ours[0], ours[1])
    assert max_diff(ours, ref) <= 1, kind


def test_true_cfg_with_negative_prompt_matches_diffusers(flux):
    kind, _, stages = flux
    emb = stages.text.encode(PROMPT, negative_prompt="blue dog")
    assert emb.negative_prompt_embeds.shape == emb.prompt_embeds.shape
    job = DenoiseJob(emb, seeds=[5], height=HEIGHT, width=WIDTH, steps=2, guidance=3.5, true_cfg_scale=4.0)
    ours = stages.generate(job)
    ref = reference(FluxPipeline, flux, seeds=[5], steps=2, negative_prompt="blue dog", true_cfg_scale=4.0)
    assert max_diff(ours, ref) <= 1
    # and it is not the unguided image
    plain = stages.generate(DenoiseJob(stages.text.encode(PROMPT), [5], HEIGHT, WIDTH, 2, 3.5))
    assert max_diff(ours, plain) > 10


def test_no_negative_prompt_no_negative_embeddings(flux):
    emb = flux[2].text.encode(PROMPT)
    assert emb.negative_prompt_embeds is None and emb.negative_pooled_prompt_embeds is None
    assert emb.prompt_embeds.shape == (1, flux[2].text.t5_window, 32) and emb.pooled_prompt_embeds.shape == (1, 32)


def test_distilled_guidance_only_for_dev(flux):
    kind, _, stages = flux
    emb = stages.text.encode(PROMPT)
    a = stages.latents([DenoiseJob(emb, [1], 64, 64, 2, guidance=1.0)])[-1][1]
    b = stages.latents([DenoiseJob(emb, [1], 64, 64, 2, guidance=5.0)])[-1][1]
    if kind == "tiny-flux-dev":
        assert np.abs(a - b).max() > 1e-3  # the guidance value reaches the transformer
    else:
        assert np.array_equal(a, b)  # schnell has no guidance input


def test_previews_come_before_final_and_differ_from_it(flux):
    _, _, stages = flux
    job = DenoiseJob(stages.text.encode(PROMPT), [7, 8], HEIGHT, WIDTH, 3, 3.5)
    events = stages.latents([job], preview_steps={1, 2, 3})
    assert [k for k, _ in events] == ["preview", "preview", "final"]  # never a preview at the last step
    final = stages.vae.decode(events[-1][1])
    for _, latents in events[:-1]:
        assert latents.shape == events[-1][1].shape == (2, 16, HEIGHT // 8, WIDTH // 8)
        preview = stages.vae.decode(latents)
        assert max_diff(preview, final) > 10
    # The clean-image estimate gets closer to the final image step by step.
    first, second = (np.abs(stages.vae.decode(e[1]).astype(float) - final).mean() for e in events[:2])
    assert second < first


def test_batch_of_two_jobs_gives_each_its_own_images(flux):
    _, _, stages = flux
    a = DenoiseJob(stages.text.encode("a red cat"), [11], HEIGHT, WIDTH, 2, 3.5)
    b = DenoiseJob(stages.text.encode("a blue dog in the sea"), [12, 13], HEIGHT, WIDTH, 2, 3.5)
    assert a.batch_key() == b.batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert together.shape == (3, 16, HEIGHT // 8, WIDTH // 8)
    assert np.abs(together - alone).max() < 1e-4
    assert max_diff(stages.vae.decode(together), stages.vae.decode(alone)) <= 1


def test_token_count_and_truncation_keep_the_clients_text(flux):
    text = flux[2].text
    tokenizer = text.text_pipe.tokenizer_2
    short = text.encode("A red cat!")
    assert (short.truncated, short.encoded_prompt) == (False, "A red cat!")
    assert short.token_count == len(tokenizer("A red cat!", add_special_tokens=False).input_ids)

    long = "Zebra, Quokka & the Otter's photo; " * 10
    e = text.encode(long, count_prompt="just this")
    assert e.truncated and long.startswith(e.encoded_prompt) and len(e.encoded_prompt) < len(long)
    kept = tokenizer(e.encoded_prompt, add_special_tokens=False).input_ids
    assert len(kept) == text.t5_window - 1  # the whole window but </s>
    assert e.token_count == len(tokenizer("just this", add_special_tokens=False).input_ids)
    # The cut prompt encodes to the same embeddings as the whole one.
    assert np.allclose(text.encode(e.encoded_prompt).prompt_embeds, e.prompt_embeds)


def test_probes(flux):
    _, _, stages = flux
    assert stages.text.probe_text() and stages.denoiser.probe_denoiser() and stages.vae.probe_vae()


def test_size_must_divide_by_16(flux):
    _, _, stages = flux
    with pytest.raises(ValueError, match="divides by 16"):
        stages.latents([DenoiseJob(stages.text.encode(PROMPT), [1], 72, 64, 1, 3.5)])


def test_img2img_matches_diffusers(flux):
    kind, _, stages = flux
    rng = np.random.default_rng(0)
    # A smooth image (a random one would be all high frequencies).
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([xx * 2, yy * 3, (xx + yy) % 256], -1).astype(np.uint8)
    pixels = np.clip(pixels + rng.integers(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    edit = stages.vae.encode_image(pixels)
    job = DenoiseJob(stages.text.encode(PROMPT), [9], HEIGHT, WIDTH, steps=4, guidance=3.5, edit=edit, strength=0.6)
    assert stages.denoiser.steps_for(job) == 3  # FLUX rounds 4 - 2.4 down: three steps
    ours = stages.generate(job)
    ref = reference(FluxImg2ImgPipeline, flux, seeds=[9], steps=4, image=Image.fromarray(pixels), strength=0.6)
    assert_not_flat(ours)
    assert max_diff(ours, ref) <= 1
    # and the edit starts from the input: closer to it than a generation is
    plain = stages.generate(DenoiseJob(job.embeddings, [9], HEIGHT, WIDTH, 4, 3.5))
    assert np.abs(ours.astype(float) - pixels).mean() < np.abs(plain.astype(float) - pixels).mean()


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_matches_diffusers_and_keeps_the_rest(flux, strength):
    """A mask on FLUX.1 dev/schnell: FluxInpaintPipeline's blend."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([xx * 2, yy * 3, (xx + yy) % 256], -1).astype(np.uint8)
    pixels = np.clip(pixels + rng.integers(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, 40:90] = 0  # OpenAI's mask: edit (alpha 0) in a band off the 16-pixel grid
    _, _, stages = flux
    edit = stages.vae.encode_image(pixels, alpha)
    assert edit.mask.shape == (1, 1, HEIGHT // 8, WIDTH // 8) and edit.masked_mean is None
    job = DenoiseJob(stages.text.encode(PROMPT), [9], HEIGHT, WIDTH, steps=4, guidance=3.5, edit=edit, strength=strength)
    ours = stages.generate(job)
    mask = Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8))  # diffusers': white repaints
    ref = reference(FluxInpaintPipeline, flux, seeds=[9], steps=4, image=Image.fromarray(pixels), mask_image=mask, strength=strength)
    assert_not_flat(ours)
    diff = max_diff(ours, ref)
    print(f"FLUX.1 inpaint ({flux[0]}, strength {strength}): max pixel difference to FluxInpaintPipeline {diff}")
    assert diff <= 1
    # Outside the mask the final latents are the input's whatever the
    # prompt; inside, the prompt changes them.
    other = DenoiseJob(stages.text.encode("a blue dog"), [9], HEIGHT, WIDTH, 4, 3.5, edit=edit, strength=strength)
    a, b = stages.latents([job])[-1][1], stages.latents([other])[-1][1]
    keep = edit.mask[0, 0] == 0
    assert np.abs(a - b)[:, :, keep].max() == 0 and np.abs(a - b)[:, :, ~keep].max() > 1e-3


def test_generic_stages_pick_flux_from_model_index(flux):
    """The registry maps FluxPipeline to FluxArchitecture, and the generic stage classes run it."""
    from serve_app.pipeline.architectures import architecture_for
    from serve_app.pipeline.decoders import LatentDecoder
    from serve_app.pipeline.denoise import LatentDenoiser
    from serve_app.pipeline.encoders import PromptEncoder

    _, model_dir, stages = flux
    layout = PipelineLayout.read(model_dir)
    assert architecture_for(layout) is FluxArchitecture
    job = DenoiseJob(PromptEncoder(layout).encode(PROMPT), [3], HEIGHT, WIDTH, 2, 3.5)
    latents = LatentDenoiser(layout).denoise(job)
    assert np.array_equal(latents, stages.latents([job])[-1][1])
    assert LatentDecoder(layout).decode(latents).shape == (1, HEIGHT, WIDTH, 3)
