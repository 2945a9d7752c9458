"""FLUX.2 [klein] through Flux2KleinArchitecture's stage methods, on a tiny
model, against diffusers' own Flux2KleinPipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import Flux2KleinPipeline
from PIL import Image

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.architectures.flux2 import Flux2KleinArchitecture
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob, EditsUnsupported
from tests.pipeline.stage_checks import Stages, assert_not_flat, max_diff, pipeline_pixels
from tests.pipeline.test_arch_flux import PROMPT
from tests.pipeline.test_arch_flux_edit import HEIGHT, WIDTH, band_alpha, smooth_image


@pytest.fixture(scope="module")
def klein(tiny_model_dir):
    model_dir = tiny_model_dir("tiny-flux2-klein")
    return model_dir, Stages(Flux2KleinArchitecture, model_dir)


@pytest.fixture(scope="module")
def reference_pipe(klein):
    pipe = Flux2KleinPipeline.from_pretrained(klein[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, seeds, steps, guidance, **kwargs) -> np.ndarray:
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


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_text_to_image_matches_diffusers_two_images(klein, reference_pipe, guidance):
    """With guidance 4 both halves run (as [klein] base); at 1 only the prompt (as the distilled models always)."""
    _, stages = klein
    emb = stages.text.encode(PROMPT)
    assert emb.prompt_embeds.shape == (1, 64, 48) and emb.pooled_prompt_embeds is None  # three 16-wide layers
    ours = stages.generate(DenoiseJob(emb, [3, 4], HEIGHT, WIDTH, steps=3, guidance=guidance))
    ref = reference(reference_pipe, [3, 4], 3, guidance)
    assert_not_flat(ours)
    assert not np.array_equal(ours[0], ours[1])
    diff = max_diff(ours, ref)
    print(f"FLUX.2 [klein] text-to-image, guidance {guidance}: max pixel difference to Flux2KleinPipeline {diff}")
    assert diff <= 1


def test_reference_edit_matches_diffusers(klein, reference_pipe):
    _, stages = klein
    pixels = smooth_image(3)
    edit = stages.vae.encode_image(pixels)
    assert edit.mean is None and [r.shape for r in edit.references] == [(1, 128, HEIGHT // 16, WIDTH // 16)]
    job = DenoiseJob(stages.text.encode(PROMPT), [5], HEIGHT, WIDTH, steps=3, guidance=4.0, edit=edit, strength=0.5)
    assert stages.denoiser.steps_for(job) == 3  # from noise, whatever the strength
    ours = stages.generate(job)
    ref = reference(reference_pipe, [5], 3, 4.0, image=Image.fromarray(pixels))
    diff = max_diff(ours, ref)
    print(f"FLUX.2 [klein] reference edit: max pixel difference to Flux2KleinPipeline {diff}")
    assert diff <= 1
    other = DenoiseJob(job.embeddings, [5], HEIGHT, WIDTH, 3, 4.0, edit=stages.vae.encode_image(smooth_image(4)))
    assert np.abs(stages.latents([job])[-1][1] - stages.latents([other])[-1][1]).max() > 1e-3  # the reference is read


def test_two_references_at_their_own_sizes_match_diffusers(klein, reference_pipe):
    """Every image sent is a reference, each at its own size, as the pipeline takes a list of images."""
    _, stages = klein
    first, second = smooth_image(3), np.ascontiguousarray(smooth_image(4)[:, :64])
    edit = stages.vae.encode_image(first, references=[first, second])
    assert [r.shape[2:] for r in edit.references] == [(HEIGHT // 16, WIDTH // 16), (4, 4)]
    job = DenoiseJob(stages.text.encode(PROMPT), [5], HEIGHT, WIDTH, steps=3, guidance=4.0, edit=edit)
    ours = stages.generate(job)
    ref = reference(reference_pipe, [5], 3, 4.0, image=[Image.fromarray(first), Image.fromarray(second)])
    diff = max_diff(ours, ref)
    print(f"FLUX.2 [klein] two references: max pixel difference to Flux2KleinPipeline {diff}")
    assert diff <= 1


def test_batch_of_two_gives_each_its_own_and_previews(klein):
    _, stages = klein
    a = DenoiseJob(stages.text.encode("a red cat"), [11], HEIGHT, WIDTH, 3, 4.0, edit=stages.vae.encode_image(smooth_image(1)))
    b = DenoiseJob(stages.text.encode("a blue dog"), [12, 13], HEIGHT, WIDTH, 3, 4.0, edit=stages.vae.encode_image(smooth_image(2)))
    assert a.batch_key() == b.batch_key() != DenoiseJob(a.embeddings, [11], HEIGHT, WIDTH, 3, 4.0).batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert together.shape == (3, 128, HEIGHT // 16, WIDTH // 16)
    assert np.abs(together - alone).max() < 1e-4
    events = stages.latents([a], preview_steps={1, 2, 3})
    assert [k for k, _ in events] == ["preview", "preview", "final"]
    assert max_diff(stages.vae.decode(events[0][1]), stages.vae.decode(events[-1][1])) > 10


def test_token_count_and_truncation_keep_the_clients_text(klein):
    text = klein[1].text
    tokenizer = text.text_pipe.tokenizer
    short = text.encode("A red cat!")
    assert (short.truncated, short.encoded_prompt) == (False, "A red cat!")
    assert short.token_count == len(tokenizer("A red cat!", add_special_tokens=False).input_ids)
    long = "Zebra, Quokka & the Otter's photo; " * 10
    e = text.encode(long, count_prompt="just this")
    assert e.truncated and long.startswith(e.encoded_prompt) and len(e.encoded_prompt) < len(long)
    assert e.token_count == len(tokenizer("just this", add_special_tokens=False).input_ids)
    # What the window keeps encodes to the same embeddings as the whole prompt.
    assert np.allclose(text.encode(e.encoded_prompt).prompt_embeds, e.prompt_embeds)


def test_distilled_checkpoint_has_no_negative_and_ignores_guidance(klein, tmp_path):
    model_dir, _ = klein
    distilled = shutil.copytree(model_dir, tmp_path / "distilled")
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    stages = Stages(Flux2KleinArchitecture, distilled)
    emb = stages.text.encode(PROMPT)
    assert emb.negative_prompt_embeds is None
    a, b = (stages.latents([DenoiseJob(emb, [1], HEIGHT, WIDTH, 2, g)])[-1][1] for g in (1.0, 5.0))
    assert np.array_equal(a, b)


def test_mask_refused_probes_and_registry(klein):
    _, stages = klein
    with pytest.raises(EditsUnsupported):
        stages.vae.encode_image(smooth_image(0), band_alpha(0, 16))
    assert architecture_for(PipelineLayout.read(stages.layout.root)) is Flux2KleinArchitecture
    assert stages.text.probe_text() and stages.denoiser.probe_denoiser() and stages.vae.probe_vae()
