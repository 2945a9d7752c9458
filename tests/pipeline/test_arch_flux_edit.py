"""FLUX.1 Fill and Kontext through their architectures' stage methods, on
tiny models, against diffusers' own FluxFillPipeline / FluxKontextPipeline."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FluxFillPipeline, FluxKontextPipeline
from PIL import Image

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.architectures.flux import FluxFillArchitecture, FluxKontextArchitecture
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.types import DenoiseJob, EditsUnsupported, NeedsInputImage
from tests.pipeline.stage_checks import Stages, assert_not_flat, max_diff, pipeline_pixels
from tests.pipeline.test_arch_flux import PROMPT

# Not square, so that a height/width mix-up in packing, ids or the mask shows.
HEIGHT, WIDTH = 64, 96


def smooth_image(seed: int) -> np.ndarray:
    """A smooth image with a little noise (a random one is all high frequencies)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([xx * 2 + seed * 40, yy * 3, (xx + yy) % 256], -1) % 256
    return np.clip(pixels + rng.integers(0, 8, pixels.shape), 0, 255).astype(np.uint8)


def band_alpha(left: int, right: int) -> np.ndarray:
    """OpenAI's mask alpha: 0 (edit) in a vertical band, 255 (keep) elsewhere; not on the 16-pixel grid."""
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, left:right] = 0
    return alpha


@pytest.fixture(scope="module")
def fill(tiny_model_dir):
    model_dir = tiny_model_dir("tiny-flux-fill")
    return model_dir, Stages(FluxFillArchitecture, model_dir)


@pytest.fixture(scope="module")
def kontext(tiny_model_dir):
    model_dir = tiny_model_dir("tiny-flux-kontext")
    return model_dir, Stages(FluxKontextArchitecture, model_dir)


def run_diffusers(pipe, seeds, steps, guidance, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipeline_pixels(
        pipe,
        seeds,
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=len(seeds),
        max_sequence_length=64,
        **kwargs,
    )


# --- FLUX.1 Fill -------------------------------------------------------------------


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_fill_matches_diffusers(fill, strength):
    model_dir, stages = fill
    pixels, alpha = smooth_image(0), band_alpha(20, 70)
    edit = stages.vae.encode_image(pixels, alpha)
    assert edit.mask.shape == (1, 64, HEIGHT // 8, WIDTH // 8) and edit.masked_mean.shape == edit.mean.shape
    job = DenoiseJob(stages.text.encode(PROMPT), [5], HEIGHT, WIDTH, steps=3, guidance=30.0, edit=edit, strength=strength)
    ours = stages.generate(job)
    # diffusers' mask: white (1) where to repaint, the opposite of OpenAI's alpha.
    mask = Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8))
    ref = run_diffusers(
        FluxFillPipeline.from_pretrained(model_dir), [5], 3, 30.0, image=Image.fromarray(pixels), mask_image=mask, strength=strength
    )
    assert_not_flat(ours)
    diff = max_diff(ours, ref)
    print(f"FLUX.1 Fill, strength {strength}: max pixel difference to FluxFillPipeline {diff}")
    assert diff <= 1


def test_fill_mask_and_masked_image_reach_the_transformer(fill):
    """The same input with another mask gives another image (the extra channels are read)."""
    _, stages = fill
    pixels, emb = smooth_image(0), stages.text.encode(PROMPT)
    a, b = (
        stages.latents([DenoiseJob(emb, [1], HEIGHT, WIDTH, 2, 30.0, edit=stages.vae.encode_image(pixels, band_alpha(*band)))])[-1][1]
        for band in ((0, 30), (50, 90))
    )
    assert np.abs(a - b).max() > 1e-3


def test_fill_batch_of_two_edits_gives_each_its_own_and_previews(fill):
    _, stages = fill
    a = DenoiseJob(stages.text.encode("a red cat"), [11], HEIGHT, WIDTH, 3, 30.0, edit=stages.vae.encode_image(smooth_image(1), band_alpha(0, 40)))
    b = DenoiseJob(stages.text.encode("a blue dog"), [12, 13], HEIGHT, WIDTH, 3, 30.0, edit=stages.vae.encode_image(smooth_image(2), None))
    assert a.batch_key() == b.batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert together.shape == (3, 16, HEIGHT // 8, WIDTH // 8)
    assert np.abs(together - alone).max() < 1e-4
    events = stages.latents([a], preview_steps={1, 2, 3})
    assert [k for k, _ in events] == ["preview", "preview", "final"]
    assert max_diff(stages.vae.decode(events[0][1]), stages.vae.decode(events[-1][1])) > 10


def test_fill_refuses_text_to_image_before_batching(fill):
    model_dir, stages = fill
    denoiser = LatentDenoiser(PipelineLayout.read(model_dir))
    job = DenoiseJob(stages.text.encode(PROMPT), [1], HEIGHT, WIDTH, 2, 30.0)
    with pytest.raises(NeedsInputImage):
        denoiser.check(job)
    with pytest.raises(NeedsInputImage):
        denoiser.denoise(job)


# --- FLUX.1 Kontext ----------------------------------------------------------------


def test_kontext_edit_matches_diffusers_two_images(kontext):
    model_dir, stages = kontext
    pixels = smooth_image(3)
    edit = stages.vae.encode_image(pixels)
    assert edit.mask is None and len(edit.references) == 1 and edit.references[0].shape == (1, 16, HEIGHT // 8, WIDTH // 8)
    job = DenoiseJob(stages.text.encode(PROMPT), [3, 4], HEIGHT, WIDTH, steps=3, guidance=2.5, edit=edit, strength=0.6)
    assert stages.denoiser.steps_for(job) == 3  # from noise: every step, whatever the strength
    ours = stages.generate(job)
    ref = run_diffusers(
        FluxKontextPipeline.from_pretrained(model_dir), [3, 4], 3, 2.5,
        image=Image.fromarray(pixels), max_area=HEIGHT * WIDTH, _auto_resize=False,
    )
    assert_not_flat(ours)
    assert not np.array_equal(ours[0], ours[1])
    diff = max_diff(ours, ref)
    print(f"FLUX.1 Kontext edit: max pixel difference to FluxKontextPipeline {diff}")
    assert diff <= 1
    # The reference reaches the transformer: another input gives other
    # latents (by little: the tiny random VAE's latents are small).
    other = DenoiseJob(job.embeddings, [3], HEIGHT, WIDTH, 3, 2.5, edit=stages.vae.encode_image(smooth_image(4)))
    job.seeds = [3]
    assert np.abs(stages.latents([job])[-1][1] - stages.latents([other])[-1][1]).max() > 1e-3


def test_kontext_text_to_image_matches_diffusers(kontext):
    model_dir, stages = kontext
    ours = stages.generate(DenoiseJob(stages.text.encode(PROMPT), [6], HEIGHT, WIDTH, steps=2, guidance=2.5))
    ref = run_diffusers(FluxKontextPipeline.from_pretrained(model_dir), [6], 2, 2.5, max_area=HEIGHT * WIDTH)
    diff = max_diff(ours, ref)
    print(f"FLUX.1 Kontext text-to-image: max pixel difference to FluxKontextPipeline {diff}")
    assert diff <= 1


def test_kontext_batch_of_two_edits_gives_each_its_own_and_previews(kontext):
    _, stages = kontext
    a = DenoiseJob(stages.text.encode("a red cat"), [11], HEIGHT, WIDTH, 3, 2.5, edit=stages.vae.encode_image(smooth_image(1)))
    b = DenoiseJob(stages.text.encode("a blue dog"), [12, 13], HEIGHT, WIDTH, 3, 2.5, edit=stages.vae.encode_image(smooth_image(2)))
    generation = DenoiseJob(a.embeddings, [11], HEIGHT, WIDTH, 3, 2.5)
    assert a.batch_key() == b.batch_key() != generation.batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert together.shape == (3, 16, HEIGHT // 8, WIDTH // 8)
    assert np.abs(together - alone).max() < 1e-4
    events = stages.latents([a], preview_steps={1, 2, 3})
    assert [k for k, _ in events] == ["preview", "preview", "final"]
    assert max_diff(stages.vae.decode(events[0][1]), stages.vae.decode(events[-1][1])) > 10


def test_kontext_refuses_a_mask(kontext):
    with pytest.raises(EditsUnsupported):
        kontext[1].vae.encode_image(smooth_image(0), band_alpha(0, 16))


@pytest.mark.parametrize("kind, arch", [("tiny-flux-fill", FluxFillArchitecture), ("tiny-flux-kontext", FluxKontextArchitecture)])
def test_registry_and_probes(kind, arch, fill, kontext):
    stages = fill[1] if kind == "tiny-flux-fill" else kontext[1]
    assert architecture_for(PipelineLayout.read(stages.layout.root)) is arch
    assert stages.text.probe_text() and stages.denoiser.probe_denoiser() and stages.vae.probe_vae()
