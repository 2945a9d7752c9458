"""The embedded model's untrained components (serve_app/pipeline/embedded.py):
the training script builds the committed model's UNet by default, so that
re-running it re-creates what is committed."""

from __future__ import annotations

import json

from serve_app.config import PROJECT_ROOT
from serve_app.pipeline import embedded

COMMITTED = PROJECT_ROOT / "models" / "embedded-sd"
# What decides the UNet's shape and conditioning; diffusers' bookkeeping keys are left out.
ARCHITECTURE_KEYS = (
    "block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
    "norm_num_groups", "cross_attention_dim", "addition_embed_type", "resnet_time_scale_shift", "in_channels", "out_channels",
)


def architecture(config) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dict(config).items() if key in ARCHITECTURE_KEYS}


def test_the_default_unet_is_the_committed_one():
    committed = json.loads((COMMITTED / "unet" / "config.json").read_text())
    assert architecture(embedded.unet().config) == architecture(committed)


def test_the_caption_reaches_each_images_prediction():
    import torch

    unet = embedded.unet().eval()
    latents, caption = torch.randn(2, 4, 32, 32), torch.randn(2, 77, embedded.TEXT_HIDDEN)
    with torch.no_grad():
        a = unet(latents, 999, encoder_hidden_states=caption).sample
        b = unet(latents, 999, encoder_hidden_states=caption.flip(0)).sample
    assert a.shape == latents.shape
    # Swapping the two captions changes each image's prediction: the caption reaches the output.
    assert (a - b).abs().mean() > 0
