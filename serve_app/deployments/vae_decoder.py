"""VaeDecoder deployment: latents -> uint8 pixels. Holds the VAE only."""

from __future__ import annotations

import numpy as np

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.replica import describe_replica, prepare_replica
from serve_app.pipeline.decoders import LatentDecoder


class VaeDecoder:
    def __init__(self, pipeline: PipelineConfig, options: StageOptions):
        layout, device, dtype = prepare_replica(pipeline, options)
        self.decoder = LatentDecoder(layout, device, dtype)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.decoder.decode(latents)

    def describe(self) -> dict:
        return describe_replica(self)
