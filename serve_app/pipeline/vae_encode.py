"""Edits, stage 0: input pixels (and mask) -> the VAE encoder's latent distribution.

It runs in the VAE decoder's replica, on the VAE it already holds:
``AutoencoderKL.from_pretrained`` loads the encoder half with the decoder,
so serving edits costs no extra weights there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.pipeline.types import EditLatents

# OpenAI's mask marks where to edit with alpha 0. diffusers' inpaint
# pipelines binarize their mask at one half; alpha below this is "edit".
EDIT_ALPHA_BELOW = 128


def repaint_mask(alpha: np.ndarray) -> np.ndarray:
    """OpenAI's mask alpha (HxW uint8, 0 = edit) -> diffusers' binary mask (1 = repaint)."""
    return (alpha < EDIT_ALPHA_BELOW).astype(np.float32)


class ImageEncoder:
    def __init__(self, vae: torch.nn.Module, inpaint_unet: bool, device: str):
        self.vae = vae
        self.inpaint_unet = inpaint_unet
        self.device = device
        self.dtype = next(vae.parameters()).dtype
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _distribution(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        dist = self.vae.encode(image.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        """``pixels`` HxWx3 uint8 RGB at the output size; ``alpha`` HxW uint8
        (OpenAI's meaning: 0 = edit) or None for an image-to-image edit."""
        height, width = pixels.shape[:2]
        if height % self.scale_factor or width % self.scale_factor:
            raise ValueError(f"image size {width}x{height} is not a multiple of the VAE's {self.scale_factor}")
        # 1. To [-1, 1] as diffusers' image processor does (float32 / 255, then 2x - 1).
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0
        mean, std = self._distribution(image)
        if alpha is None and self.inpaint_unet:
            # An inpainting UNet always takes a mask: without one, the whole image is repainted.
            alpha = np.zeros((height, width), np.uint8)
        if alpha is None:
            return EditLatents(mean=mean, std=std)
        # 2. The mask at latent size (nearest, as diffusers' interpolate) and,
        # for an inpainting UNet, the image with the repainted region blanked.
        repaint = torch.from_numpy(repaint_mask(alpha))[None, None]
        mask = F.interpolate(repaint, size=(height // self.scale_factor, width // self.scale_factor))
        latents = EditLatents(mean=mean, std=std, mask=mask.numpy())
        if self.inpaint_unet:
            latents.masked_mean, latents.masked_std = self._distribution(image * (repaint < 0.5))
        return latents

    def probe(self) -> bool:
        """Encode the smallest image; True when finite."""
        with torch.inference_mode():
            mean, std = self._distribution(torch.zeros(1, 3, self.scale_factor, self.scale_factor))
        return bool(np.isfinite(mean).all() and np.isfinite(std).all())
