"""Edit stage code on tiny models, without Ray: img2img and inpainting give
diffusers' own pipelines' pixels, strength 0 keeps the input, and the
composite never changes what the mask protects."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.denoiser import Denoiser
from serve_app.deployments.text_encoder import TextEncoder
from serve_app.deployments.vae_decoder import VaeDecoder
from serve_app.pipeline.types import DenoiseJob

SIZE = 128
PROMPT = "a red circle on a blue background"


def sync(result):
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def input_image() -> np.ndarray:
    """A picture with structure (gradients and a square), so latents are not flat."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    img[32:96, 40:88] = (250, 30, 40)
    return img


def input_mask() -> np.ndarray:
    """OpenAI's meaning: alpha 0 (edit) in a band across the middle, 255 elsewhere."""
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[40:88, 24:104] = 0
    return alpha


def load_stages(model_dir, cache):
    pipeline = PipelineConfig(source=str(model_dir))
    opts = StageOptions(torch_threads=2)
    members = {"test": pipeline}
    stages = TextEncoder(members, opts, cache), Denoiser(members, opts, cache), VaeDecoder(members, opts, cache)
    assert [s.problem() for s in stages] == [None, None, None]
    return stages


@pytest.fixture(scope="module")
def model_dirs(tiny_sd_dir, tiny_sdxl_dir, tiny_sd_inpaint_dir):
    return {"tiny-sd": tiny_sd_dir, "tiny-sdxl": tiny_sdxl_dir, "tiny-sd-inpaint": tiny_sd_inpaint_dir}


_loaded: dict = {}


@pytest.fixture()
def stages_of(model_dirs, tmp_path_factory):
    def get(kind):
        if kind not in _loaded:
            _loaded[kind] = load_stages(model_dirs[kind], str(tmp_path_factory.mktemp("cache")))
        return _loaded[kind]

    return get


def run_edit(stages, seeds, strength, alpha=None, steps=4, guidance=7.5):
    te, dn, vae = stages
    emb = sync(te.encode(PROMPT))
    edit = sync(vae.encode(input_image(), alpha))
    job = DenoiseJob(emb, list(seeds), SIZE, SIZE, steps, guidance, edit=edit, strength=strength)
    latents = sync(dn.denoise(job))
    return latents, sync(vae.decode(latents))


def diffusers_pixels(model_dir, kind: str, seeds, strength, alpha=None, steps=4, guidance=7.5) -> np.ndarray:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    image = Image.fromarray(input_image())
    common = dict(
        prompt=PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
        num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
    )
    if alpha is None:
        pipe = AutoPipelineForImage2Image.from_pretrained(str(model_dir))
        out = pipe(**common).images
    else:
        pipe = AutoPipelineForInpainting.from_pretrained(str(model_dir))
        # diffusers' mask is white where to repaint: the inverse of OpenAI's alpha.
        out = pipe(**common, mask_image=Image.fromarray(255 - alpha), height=SIZE, width=SIZE).images
    return (out * 255).round().astype(np.uint8)


# Tolerance: one grey level, as for generation (float32 on CPU, different batching of the same ops).
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-sdxl"])
def test_img2img_matches_diffusers(kind, stages_of, model_dirs):
    _, pixels = run_edit(stages_of(kind), seeds=(3, 4), strength=0.75)
    ref = diffusers_pixels(model_dirs[kind], kind, seeds=(3, 4), strength=0.75)
    assert np.abs(ref.astype(int) - pixels.astype(int)).max() <= 1


@pytest.mark.parametrize("kind, strength", [("tiny-sd", 0.75), ("tiny-sd", 1.0), ("tiny-sdxl", 0.75), ("tiny-sd-inpaint", 1.0), ("tiny-sd-inpaint", 0.5)])
def test_inpaint_matches_diffusers(kind, strength, stages_of, model_dirs):
    # One image: diffusers' inpaint pipelines sample the input's latents from
    # the first generator only, so only a one-image request is comparable.
    _, pixels = run_edit(stages_of(kind), seeds=(11,), strength=strength, alpha=input_mask())
    ref = diffusers_pixels(model_dirs[kind], kind, seeds=(11,), strength=strength, alpha=input_mask())
    assert np.abs(ref.astype(int) - pixels.astype(int)).max() <= 1


def test_strength_zero_returns_the_inputs_latents(stages_of):
    te, dn, vae = stages_of("tiny-sd")
    edit = sync(vae.encode(input_image()))
    latents, _ = run_edit((te, dn, vae), seeds=(5,), strength=0.0)
    g = torch.Generator().manual_seed(5)
    expected = dn.ready().model.arch.vae_scaling_factor * (edit.mean + edit.std * torch.randn(edit.mean.shape, generator=g).numpy())
    assert np.allclose(latents, expected, atol=1e-6)


def test_blend_keeps_unmasked_latents(stages_of):
    """With an ordinary UNet, the last step puts the input's own latents back wherever the mask keeps them."""
    te, dn, vae = stages_of("tiny-sd")
    alpha = input_mask()
    edit = sync(vae.encode(input_image(), alpha))
    latents, _ = run_edit((te, dn, vae), seeds=(5,), strength=0.75, alpha=alpha)
    g = torch.Generator().manual_seed(5)
    input_latents = dn.ready().model.arch.vae_scaling_factor * (edit.mean + edit.std * torch.randn(edit.mean.shape, generator=g).numpy())
    keep = edit.mask[0, 0] == 0
    repaint = ~keep
    assert keep.any() and repaint.any()
    assert np.allclose(latents[0][:, keep], input_latents[0][:, keep], atol=1e-6)
    assert not np.allclose(latents[0][:, repaint], input_latents[0][:, repaint], atol=1e-2)
