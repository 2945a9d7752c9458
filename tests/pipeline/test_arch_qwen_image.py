"""Qwen-Image through QwenImageArchitecture's stage methods, on the tiny
model, against diffusers' own QwenImagePipeline."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.pipeline.architectures.qwen_image import QwenImageArchitecture
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob
from tests.pipeline.stage_checks import Stages, assert_not_flat, max_diff, one_torch_thread, pipeline_pixels  # noqa: F401 (one_torch_thread: autouse)

PROMPT = "a photo of a red cat on the sea"
# Not square, so that a height/width mix-up in packing or RoPE shapes shows.
HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("tiny-qwen-image")


@pytest.fixture(scope="module")
def stages(model_dir):
    return Stages(QwenImageArchitecture, model_dir)


@pytest.fixture(scope="module")
def reference_pipe(model_dir):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, seeds, steps, **kwargs) -> np.ndarray:
    return pipeline_pixels(
        pipe, seeds, prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, num_images_per_prompt=len(seeds), **kwargs
    )


def test_matches_diffusers_with_true_cfg_and_without(stages, reference_pipe):
    emb = stages.text.encode(PROMPT)
    # Variable length: as long as the prompt (and the template's suffix), not a fixed window.
    assert emb.prompt_embeds.shape[0] == 1 and emb.prompt_embeds.shape[2] == 32
    assert emb.negative_prompt_embeds.shape[1] < emb.prompt_embeds.shape[1]
    guided = stages.generate(DenoiseJob(emb, seeds=[3, 4], height=HEIGHT, width=WIDTH, steps=2, guidance=4.0))
    ref = reference(reference_pipe, [3, 4], 2, negative_prompt="", true_cfg_scale=4.0)
    assert guided.shape == (2, HEIGHT, WIDTH, 3) and guided.dtype == np.uint8
    assert_not_flat(guided)
    assert not np.array_equal(guided[0], guided[1])
    # Our prompt and negative halves run as one padded, masked batch; diffusers runs them apart.
    assert max_diff(guided, ref) <= 1

    unguided = DenoiseJob(emb, seeds=[3], height=HEIGHT, width=WIDTH, steps=2, guidance=1.0)
    assert max_diff(stages.generate(unguided), reference(reference_pipe, [3], 2)) == 0
    # Guidance reaches the latents (random weights make its effect on pixels small).
    guided_latents = stages.latents([DenoiseJob(emb, [3], HEIGHT, WIDTH, 2, 4.0)])[-1][1]
    assert np.abs(stages.latents([unguided])[-1][1] - guided_latents).max() > 1e-2


def test_batch_of_prompts_of_different_lengths_gives_each_its_own_images(stages):
    a = DenoiseJob(stages.text.encode("a red cat"), [11], HEIGHT, WIDTH, 2, 4.0)
    b = DenoiseJob(stages.text.encode("a blue dog in the deep sea, in the rain"), [12, 13], HEIGHT, WIDTH, 2, 4.0)
    assert a.embeddings.prompt_embeds.shape[1] != b.embeddings.prompt_embeds.shape[1]
    assert a.batch_key() == b.batch_key()
    together = stages.latents([a, b])[-1][1]
    alone = np.concatenate([stages.latents([a])[-1][1], stages.latents([b])[-1][1]])
    assert together.shape == (3, 16, HEIGHT // 8, WIDTH // 8)
    assert np.abs(together - alone).max() < 1e-4
    assert max_diff(stages.vae.decode(together), stages.vae.decode(alone)) <= 1


def test_previews_come_before_final_and_approach_it(stages):
    job = DenoiseJob(stages.text.encode(PROMPT), [7], HEIGHT, WIDTH, 3, 4.0)
    events = stages.latents([job], preview_steps={1, 2, 3})
    assert [k for k, _ in events] == ["preview", "preview", "final"]  # never a preview at the last step
    final = stages.vae.decode(events[-1][1])
    distances = [np.abs(stages.vae.decode(latents).astype(float) - final).mean() for _, latents in events[:-1]]
    assert distances[0] > distances[1] > 0


def test_token_count_and_truncation_keep_the_clients_text(stages):
    text = stages.text
    tokenizer = text.text_pipe.tokenizer
    short = text.encode("A red cat!", count_prompt="cat")
    assert (short.truncated, short.encoded_prompt) == (False, "A red cat!")
    assert short.token_count == len(tokenizer("cat").input_ids) == 2  # byte-level with the merge "at": c, at

    long = "Zebra, quokka and the otter. " * 30
    e = text.encode(long)
    assert e.token_count == len(tokenizer(long).input_ids) > text.prompt_window
    assert e.truncated and long.startswith(e.encoded_prompt) and len(e.encoded_prompt) < len(long)
    assert len(tokenizer(e.encoded_prompt).input_ids) <= text.prompt_window


def test_probes_and_size_rule(stages):
    assert stages.text.probe_text() and stages.denoiser.probe_denoiser() and stages.vae.probe_vae()
    with pytest.raises(ValueError, match="divides by 16"):
        stages.latents([DenoiseJob(stages.text.encode(PROMPT), [1], 72, 64, 1, 4.0)])


def test_generic_stages_pick_qwen_image_from_model_index(model_dir, stages):
    from serve_app.pipeline.architectures import architecture_for
    from serve_app.pipeline.denoise import LatentDenoiser

    layout = PipelineLayout.read(model_dir)
    assert architecture_for(layout) is QwenImageArchitecture
    job = DenoiseJob(stages.text.encode(PROMPT), [3], HEIGHT, WIDTH, 2, 4.0)
    assert np.array_equal(LatentDenoiser(layout).denoise(job), stages.latents([job])[-1][1])
