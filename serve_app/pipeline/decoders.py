"""Stage 3: latents -> uint8 pixels."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.sources import SourceFiles


class LatentDecoder:
    """Loads only the VAE of a pipeline."""

    SOURCE_FILES = SourceFiles("vae_decoder", ("model_index.json", "vae/*"))

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = device
        vae = layout.load("vae", dtype=dtype, device=device)
        # SDXL's VAE overflows in float16; its config asks to be run in float32.
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae = vae.to(torch.float32)
        self.vae = vae
        self.dtype = next(vae.parameters()).dtype

    def loaded_components(self) -> list[str]:
        return ["vae"]

    def decode_many(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        """Decode several latent arrays, those of one shape as one batch."""
        results: list[np.ndarray | None] = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, latents in enumerate(batch):
            groups.setdefault(latents.shape[1:], []).append(i)
        for indices in groups.values():
            pixels = self.decode(np.concatenate([batch[i] for i in indices]))
            offset = 0
            for i in indices:
                results[i] = pixels[offset : offset + len(batch[i])]
                offset += len(batch[i])
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def probe(self) -> bool:
        """Decode the smallest latent; True when the pixels are finite."""
        z = torch.zeros(1, self.vae.config.latent_channels, 4, 4, device=self.device, dtype=self.dtype)
        return bool(torch.isfinite(self.vae.decode(z).sample).all())

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(n, C, h, w) float latents -> (n, H, W, 3) uint8 RGB."""
        z = torch.from_numpy(latents).to(self.device, self.dtype)
        z = z / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        images = self.vae.decode(z).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        return np.ascontiguousarray((images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy())
