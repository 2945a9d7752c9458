"""VaeDecoder deployment: latents -> uint8 pixels. Holds the VAE only."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.deployments.batching import BatchRunner
from serve_app.deployments.replica import ModelStage, optimize_module
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.decoders import LatentDecoder


class VaeDecoder(ModelStage):
    files = LatentDecoder.SOURCE_FILES

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        self.decoder = LatentDecoder(layout, device, dtype)
        self.decoder.vae = optimize_module(self.decoder.vae, self.options, device)
        self.batches = BatchRunner("vae_decoder", self.decoder.decode_many, self.options)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        self.ready()
        return await self.batches.run(latents, len(latents))

    def probe(self) -> bool:
        return self.decoder.probe()
