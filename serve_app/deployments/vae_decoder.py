"""VaeDecoder deployment: latents -> uint8 pixels. Holds the VAE only."""

from __future__ import annotations

import numpy as np

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.batching import BatchRunner
from serve_app.deployments.replica import describe_replica, optimize_module, prepare_replica
from serve_app.pipeline.decoders import LatentDecoder


class VaeDecoder:
    def __init__(self, pipeline: PipelineConfig, options: StageOptions):
        layout, device, dtype = prepare_replica(pipeline, options)
        self.decoder = LatentDecoder(layout, device, dtype)
        self.decoder.vae = optimize_module(self.decoder.vae, options, device)
        self.batches = BatchRunner("vae_decoder", self.decoder.decode_many, options)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await self.batches.run(latents, len(latents))

    def describe(self) -> dict:
        return describe_replica(self)
