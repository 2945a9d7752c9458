"""Denoiser deployment: embeddings + seeds -> latents. Holds the UNet and scheduler only."""

from __future__ import annotations

import numpy as np

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.replica import describe_replica, prepare_replica
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.types import DenoiseJob


class Denoiser:
    def __init__(self, pipeline: PipelineConfig, options: StageOptions):
        layout, device, dtype = prepare_replica(pipeline, options)
        self.denoiser = LatentDenoiser(layout, device, dtype)

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        return self.denoiser.denoise(job)

    def describe(self) -> dict:
        return describe_replica(self)
