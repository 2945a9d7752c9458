"""Denoiser deployment: embeddings + seeds -> latents. Holds the UNet and scheduler only."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.deployments.replica import ModelStage
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.types import DenoiseJob


class Denoiser(ModelStage):
    files = LatentDenoiser.SOURCE_FILES

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        self.denoiser = LatentDenoiser(layout, device, dtype)

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        self.ready()
        return self.denoiser.denoise(job)
