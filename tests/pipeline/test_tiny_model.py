from __future__ import annotations

import json

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.architectures.sd import StableDiffusion
from serve_app.pipeline.architectures.sdxl import StableDiffusionXL
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.tiny import save_tiny_pipeline


def test_layout_is_standard_diffusers(tiny_sd_dir, tiny_sdxl_dir):
    for d, cls in ((tiny_sd_dir, "StableDiffusionPipeline"), (tiny_sdxl_dir, "StableDiffusionXLPipeline")):
        index = json.loads((d / "model_index.json").read_text())
        assert index["_class_name"] == cls
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert (d / sub).is_dir()
    assert architecture_for(PipelineLayout.read(tiny_sdxl_dir)) is StableDiffusionXL
    assert architecture_for(PipelineLayout.read(tiny_sd_dir)) is StableDiffusion


def test_vae_downsamples_8x_with_4_latent_channels(tiny_sd_dir):
    vae = json.loads((tiny_sd_dir / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8 and vae["latent_channels"] == 4


def test_build_is_deterministic_and_idempotent(tmp_path, tiny_sd_dir):
    out = save_tiny_pipeline(tmp_path / "m", "tiny-sd")
    for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (out / f).read_bytes() == (tiny_sd_dir / f).read_bytes()
    before = (out / "model_index.json").stat().st_mtime_ns
    save_tiny_pipeline(out, "tiny-sd")
    assert (out / "model_index.json").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_every_registered_architecture_imports_and_serves_distinct_classes():
    """The registry names modules by string (they import on first use): each entry must resolve."""
    from serve_app.pipeline.architectures import ARCHITECTURES, load_architecture
    from serve_app.pipeline.architectures.base import Architecture

    for path in ARCHITECTURES:
        assert issubclass(load_architecture(path), Architecture), path
    served = [name for names in ARCHITECTURES.values() for name in names]
    assert len(served) == len(set(served))
