"""VaeDecoder deployment: latents -> uint8 pixels and, for edits, input pixels
-> latents. Holds the VAE only (its encoder half comes with it)."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.deployments.batching import BatchRunner
from serve_app.deployments.replica import ModelStage, optimize_modules
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.decoders import LatentDecoder
from serve_app.pipeline.types import EditLatents


class VaeDecoder(ModelStage):
    stage = "vae_decoder"

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        self.decoder = LatentDecoder(layout, device, dtype)
        optimize_modules(self.decoder.arch, self.options, device)
        self.batches = BatchRunner("vae_decoder", self.decoder.decode_many, self.options)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        self.ready()
        return await self.batches.run(latents, len(latents))

    async def encode(
        self, pixels: np.ndarray, alpha: np.ndarray | None = None, references: list[np.ndarray] | None = None
    ) -> EditLatents:
        # Computes on the event-loop thread, as the other model stages do (see replica.use_torch_threads).
        self.ready()
        return self.decoder.encode_image(pixels, alpha, references)

    def probe(self) -> bool:
        return self.decoder.probe()
