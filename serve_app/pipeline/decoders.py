"""Stage 3: latents -> uint8 pixels (and, for edits, input pixels -> latents), for any architecture."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import EditLatents


class LatentDecoder:
    """Loads only the VAE of a pipeline. Its encoder half comes with it, so
    edits cost this stage no extra weights."""

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.arch = architecture_for(layout)(layout, device, dtype)
        self.arch.load_vae()

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

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(n, ...) latents as the denoiser hands them -> (n, H, W, 3) uint8 RGB."""
        return self.arch.decode(latents)

    def encode_image(
        self, pixels: np.ndarray, alpha: np.ndarray | None = None, references: list[np.ndarray] | None = None
    ) -> EditLatents:
        if references is not None and self.arch.edit_inputs.references:
            return self.arch.encode_image(pixels, alpha, references=references)
        return self.arch.encode_image(pixels, alpha)

    def probe(self) -> bool:
        """Decode the smallest latent; True when the pixels are finite."""
        return self.arch.probe_vae()
