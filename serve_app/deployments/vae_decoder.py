"""VaeDecoder deployment: latents -> uint8 pixels and, for edits, input pixels
-> latents. Holds the VAE only (its encoder half comes with it)."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.deployments.batching import BatchRunner
from serve_app.deployments.replica import ModelStage, optimize_module
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.decoders import LatentDecoder
from serve_app.pipeline.sources import SourceFiles
from serve_app.pipeline.types import EditLatents
from serve_app.pipeline.vae_encode import ImageEncoder


class VaeDecoder(ModelStage):
    # The UNet's config says whether edits need the masked image's latents (an inpainting UNet).
    files = SourceFiles("vae_decoder", (*LatentDecoder.SOURCE_FILES.patterns, "unet/config.json"))

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        self.decoder = LatentDecoder(layout, device, dtype)
        self.decoder.vae = optimize_module(self.decoder.vae, self.options, device)
        self.batches = BatchRunner("vae_decoder", self.decoder.decode_many, self.options)
        self.encoder = ImageEncoder(self.decoder.vae, layout.inpaint_unet, device)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        self.ready()
        return await self.batches.run(latents, len(latents))

    async def encode(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        # Computes on the event-loop thread, as the other model stages do (see replica.use_torch_threads).
        self.ready()
        return self.encoder.encode(pixels, alpha)

    def probe(self) -> bool:
        return self.decoder.probe()
