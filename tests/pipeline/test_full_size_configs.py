"""The full-size configs in configs/full-size/ build the classes their
model_index.json names, at their published sizes, without allocating weights."""

from __future__ import annotations

import json

import pytest
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.full_size import FULL_SIZE_DIR, build_component, parameter_counts

# Published parameter counts in billions, as (low, high): SDXL's UNet 2.6B
# (Podell et al. 2023), FLUX.1's transformer 12B (Black Forest Labs), CLIP
# ViT-L/14's text tower 123M, OpenCLIP bigG's 695M, T5 v1.1 XXL's encoder
# 4.76B, the 8x VAE 84M, each within 3%; SD3.5 Medium's MMDiT-X, which
# Stability AI gives as 2.5B, from 2.2B up to that.
def near(billions: float) -> tuple[float, float]:
    return billions * 0.97, billions * 1.03


CLIP_L, CLIP_G, T5_XXL, VAE = near(0.123), near(0.695), near(4.76), near(0.084)
PUBLISHED = {
    "sdxl": {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "unet": near(2.6), "vae": VAE},
    "sd3.5-medium": {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL, "transformer": (2.2, 2.5), "vae": VAE},
    "flux1-dev": {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL, "transformer": near(12.0), "vae": VAE},
    "flux1-schnell": {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL, "transformer": near(12.0), "vae": VAE},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_config_builds_its_classes_on_meta_at_published_size(name):
    root = FULL_SIZE_DIR / name
    layout = PipelineLayout.read(root)
    assert layout.pipeline_class in {"StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"}
    for component, (_, class_name) in layout.components.items():
        built = build_component(layout, component)
        if component.startswith("tokenizer"):
            # Only the tokenizer's config is kept (its vocabulary is data): the window our text stage reads.
            config = json.loads((root / component / "tokenizer_config.json").read_text())
            assert config["model_max_length"] in (77, 512)
            continue
        assert type(built).__name__ == class_name, component
        if isinstance(built, torch.nn.Module):
            assert all(p.device.type == "meta" for p in built.parameters())  # nothing allocated
    counts = parameter_counts(root)
    assert set(counts) == set(PUBLISHED[name])
    for component, (low, high) in PUBLISHED[name].items():
        assert low * 1e9 <= counts[component] <= high * 1e9, (component, counts[component])


def test_dev_and_schnell_differ_only_where_published():
    """[dev] has the guidance embedding and the shifted, resolution-dependent schedule; [schnell] neither."""
    dev, schnell = (PipelineLayout.read(FULL_SIZE_DIR / n) for n in ("flux1-dev", "flux1-schnell"))
    assert dev.component_config("transformer")["guidance_embeds"] and not schnell.component_config("transformer")["guidance_embeds"]
    sched = [json.loads((p.root / "scheduler" / "scheduler_config.json").read_text()) for p in (dev, schnell)]
    assert (sched[0]["use_dynamic_shifting"], sched[0]["shift"]) == (True, 3.0)
    assert (sched[1]["use_dynamic_shifting"], sched[1]["shift"]) == (False, 1.0)


def test_a_random_pipeline_of_a_configs_classes_and_sizes_loads_like_a_checkpoint(tmp_path, tiny_model_dir):
    """save_random_pipeline (what the GPU benchmark builds its real-size
    models with) on a tiny model's configs: the same classes and parameter
    counts, new random weights, offline tokenizers with the config's window,
    loaded by diffusers' own from_pretrained."""
    from diffusers import DiffusionPipeline

    from serve_app.pipeline.full_size import parameter_counts, save_random_pipeline

    source = tiny_model_dir("tiny-flux-schnell")
    target = save_random_pipeline(source, tmp_path / "random", dtype=torch.float16)
    assert parameter_counts(target) == parameter_counts(source)
    pipe = DiffusionPipeline.from_pretrained(str(target))
    original = DiffusionPipeline.from_pretrained(str(source))
    assert type(pipe) is type(original)
    from safetensors import safe_open

    with safe_open(str(next((target / "transformer").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # saved in the dtype asked for
    assert not torch.equal(next(pipe.transformer.parameters()).float(), next(original.transformer.parameters()).float())
    assert pipe.tokenizer.model_max_length == original.tokenizer.model_max_length
    assert pipe.tokenizer_2.model_max_length == original.tokenizer_2.model_max_length
