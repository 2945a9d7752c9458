"""VaeDecoder deployment: latents -> uint8 pixels and, for edits, input pixels
-> latents. Holds the VAE only (its encoder half comes with it)."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.deployments.replica import ModelStage, optimize_modules
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.decoders import LatentDecoder
from serve_app.pipeline.types import EditLatents


class VaeDecoder(ModelStage):
    stage = "vae_decoder"
    batch_method = "decode_many"

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> LatentDecoder:
        decoder = LatentDecoder(layout, device, dtype)
        optimize_modules(decoder.arch, self.options, device)
        return decoder

    async def decode(self, latents: np.ndarray, pipeline: str | None = None) -> np.ndarray:
        return await self.ready(pipeline).batches.run(latents, len(latents))

    async def encode(
        self,
        pixels: np.ndarray,
        alpha: np.ndarray | None = None,
        references: list[np.ndarray] | None = None,
        pipeline: str | None = None,
    ) -> EditLatents:
        # Computes on the event-loop thread, as the other model stages do (see replica.use_torch_threads).
        return self.ready(pipeline).model.encode_image(pixels, alpha, references)
