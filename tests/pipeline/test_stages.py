"""Stage code on tiny models, without Ray: shapes, dtypes, seeds, and parity with diffusers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.denoiser import Denoiser
from serve_app.deployments.replica import ModelUnavailable
from serve_app.deployments.text_encoder import TextEncoder
from serve_app.deployments.vae_decoder import VaeDecoder
from serve_app.pipeline.components import ModelLayoutError, PipelineLayout
from serve_app.pipeline.types import DenoiseJob


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def stages(request, tiny_sd_dir, tiny_sdxl_dir, tmp_path_factory):
    model_dir = tiny_sd_dir if request.param == "tiny-sd" else tiny_sdxl_dir
    pipeline = PipelineConfig(source=str(model_dir))
    opts = StageOptions(torch_threads=2)
    cache = str(tmp_path_factory.mktemp("cache"))
    members = {request.param: pipeline}
    stages = TextEncoder(members, opts, cache), Denoiser(members, opts, cache), VaeDecoder(members, opts, cache)
    assert [s.problem() for s in stages] == [None, None, None]
    return (request.param, model_dir, *stages)


def sync(result):
    """Deployment methods may be coroutines (the batched ones); run them to completion."""
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def run(stages, prompt="a cute baby sea otter", seeds=(1, 2), size=(256, 256), steps=2, guidance=7.5):
    _, _, te, dn, vae = stages
    emb = sync(te.encode(prompt))
    latents = sync(dn.denoise(DenoiseJob(emb, list(seeds), size[1], size[0], steps, guidance)))
    return emb, latents, sync(vae.decode(latents))


def test_shapes_and_dtypes(stages):
    kind = stages[0]
    emb, latents, pixels = run(stages, size=(256, 128))
    assert emb.prompt_embeds.dtype == np.float32 and emb.prompt_embeds.shape[:2] == (1, 77)
    assert emb.negative_prompt_embeds.shape == emb.prompt_embeds.shape
    if kind == "tiny-sdxl":
        assert emb.prompt_embeds.shape[2] == 64  # two encoders side by side
        assert emb.pooled_prompt_embeds.shape == (1, 32)
        assert not emb.negative_prompt_embeds.any()  # SDXL: zeros for an empty negative prompt
    else:
        assert emb.pooled_prompt_embeds is None
    assert latents.shape == (2, 4, 128 // 8, 256 // 8) and latents.dtype == np.float32
    assert pixels.shape == (2, 128, 256, 3) and pixels.dtype == np.uint8


def test_same_seed_same_pixels_other_seed_other_pixels(stages):
    _, _, a = run(stages, seeds=(7, 8))
    _, _, b = run(stages, seeds=(7, 9))
    assert np.array_equal(a[0], b[0])  # an image depends only on its own seed
    assert not np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])


def test_token_count_and_truncation(stages):
    emb = sync(stages[2].encode("word " * 100))
    assert emb.token_count > 75 and emb.truncated
    assert emb.encoded_prompt.startswith("word") and len(emb.encoded_prompt) < len("word " * 100)
    short = sync(stages[2].encode("otter"))
    assert not short.truncated and short.encoded_prompt == "otter" and 0 < short.token_count < 10


def test_encoded_prompt_is_the_prompt_as_written_cut_where_the_window_ends(stages):
    """Case, punctuation and spacing as the client wrote them (the tokenizer's
    decode would lowercase and re-space them), cut where the 75-token window
    ends: the text up to there tokenizes to exactly the window."""
    from serve_app.pipeline.architectures.base import kept_text

    prompt = "A City at Dusk, with Flying Cars; vivid colors -- DRAMATIC lighting! " * 6
    emb = sync(stages[2].encode(prompt))
    kept = emb.encoded_prompt
    assert emb.truncated and prompt.startswith(kept) and len(kept) < len(prompt)
    assert "A City at Dusk, with Flying Cars; vivid colors -- DRAMATIC lighting!" in kept
    tokenizer = stages[2].ready().model.arch.encoders[0][0]
    window = tokenizer.model_max_length - 2
    assert len(tokenizer(kept, add_special_tokens=False).input_ids) == window
    assert len(tokenizer(prompt[: len(kept) + 1], add_special_tokens=False).input_ids) > window
    # A tokenizer without offsets (a slow one) gets the same cut by counting prefixes.
    class NoOffsets:
        is_fast = False

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    assert kept_text(NoOffsets(), prompt, window) == kept


def test_matches_diffusers_pipeline(stages):
    """The split stages give the very pixels the one-process diffusers pipeline gives."""
    from diffusers import DiffusionPipeline

    kind, model_dir = stages[0], stages[1]
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    ref = pipe(
        "a cute baby sea otter",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        output_type="np",
    ).images
    ref = (ref * 255).round().astype(np.uint8)
    _, _, pixels = run(stages)
    assert np.abs(ref.astype(int) - pixels.astype(int)).max() <= 1, kind


def test_each_stage_holds_only_its_components(stages):
    _, _, te, dn, vae = stages
    assert "CLIPTextModel" in te.describe()['modules']
    assert not {"UNet2DConditionModel", "AutoencoderKL"} & set(te.describe()['modules'])
    assert dn.describe()['modules'] == ["UNet2DConditionModel"]
    assert vae.describe()['modules'] == ["AutoencoderKL"]


def test_layout_errors_name_the_problem(tmp_path, tiny_sd_dir):
    with pytest.raises(ModelLayoutError, match="model_index.json"):
        PipelineLayout.read(tmp_path)
    (tmp_path / "model_index.json").write_text((tiny_sd_dir / "model_index.json").read_text())
    layout = PipelineLayout.read(tmp_path)
    with pytest.raises(ModelLayoutError, match="unet/"):
        layout.load("unet")


def test_stream_yields_previews_then_the_same_final_latents(stages):
    _, _, te, dn, vae = stages
    job = DenoiseJob(sync(te.encode("otter")), [5], 256, 256, 4, 7.5)
    async def collect():
        return [item async for item in dn.denoise_stream(job, 2)]  # 4 steps: previews after steps 1 and 3

    events = asyncio.run(collect())
    assert [kind for kind, _ in events] == ["preview", "preview", "final"]
    assert np.array_equal(events[-1][1], sync(dn.denoise(job)))  # previews do not change the result
    previews = [sync(vae.decode(latents)) for _, latents in events]
    assert not np.array_equal(previews[0], previews[-1]) and not np.array_equal(previews[1], previews[-1])


def test_steps_counter_counts_denoising_steps(stages):
    _, _, te, dn, _ = stages
    before = dn.describe()["steps_run"]
    sync(dn.denoise(DenoiseJob(sync(te.encode("otter")), [1], 64, 64, 3, 7.5)))
    assert dn.describe()["steps_run"] - before == 3


def test_token_count_of_the_user_prompt_not_the_template(stages):
    te = stages[2]
    plain = sync(te.encode("otter"))
    templated = sync(te.encode("otter, vivid colors, dramatic lighting", count_prompt="otter"))
    assert templated.token_count == plain.token_count
    assert templated.encoded_prompt == "otter, vivid colors, dramatic lighting"


def test_a_stage_group_serves_each_pipeline_as_its_own_deployment_would(stages, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    """One replica of each stage holding SD, SDXL and a pipeline whose source
    is missing: each call gives what that pipeline's own replica gives, the
    broken one reports its problem without hiding the others, and health
    probes every model it could load."""
    kind, _, own_te, own_dn, own_vae = stages
    members = {
        "sd": PipelineConfig(source=str(tiny_sd_dir)),
        "sdxl": PipelineConfig(source=str(tiny_sdxl_dir)),
        "broken": PipelineConfig(source=str(tmp_path / "nowhere")),
    }
    opts = StageOptions(torch_threads=2)
    cache = str(tmp_path / "cache")
    te, dn, vae = TextEncoder(members, opts, cache), Denoiser(members, opts, cache), VaeDecoder(members, opts, cache)
    mine = "sd" if kind == "tiny-sd" else "sdxl"
    emb = sync(te.encode("otter", pipeline=mine))
    assert np.array_equal(emb.prompt_embeds, sync(own_te.encode("otter")).prompt_embeds)
    job = DenoiseJob(emb, [3], 64, 64, 2, 7.5)
    latents = sync(dn.denoise(job, pipeline=mine))
    assert np.array_equal(latents, sync(own_dn.denoise(job)))
    assert np.array_equal(sync(vae.decode(latents, pipeline=mine)), sync(own_vae.decode(latents)))
    # The other member is really the other model (SDXL's embeddings are wider).
    other = "sdxl" if mine == "sd" else "sd"
    assert sync(te.encode("otter", pipeline=other)).prompt_embeds.shape != emb.prompt_embeds.shape

    for stage in (te, dn, vae):
        assert stage.problem("sd") is None and stage.problem("sdxl") is None
        assert "nowhere" in stage.problem("broken")
        asyncio.run(stage.check_health())  # the broken member is skipped, the others probed
    with pytest.raises(ModelUnavailable, match="nowhere"):
        sync(te.encode("otter", pipeline="broken"))
    with pytest.raises(ValueError, match="name the pipeline"):
        te.problem()
    with pytest.raises(ValueError, match="does not serve pipeline 'sd3'"):
        sync(dn.denoise(job, pipeline="sd3"))
    assert dn.describe("sdxl")["pipelines"] == ["broken", "sd", "sdxl"]
