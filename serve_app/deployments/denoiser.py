"""Denoiser deployment: embeddings + seeds -> latents. Holds the UNet and scheduler only."""

from __future__ import annotations

from typing import Iterator

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

    def denoise_stream(self, job: DenoiseJob, preview_steps: list[int]) -> Iterator[tuple[str, np.ndarray]]:
        """Streamed to the caller (handle.options(stream=True)): previews as they happen, then the result."""
        yield from self.denoiser.denoise_steps(job, preview_steps)

    def describe(self) -> dict:
        return {**describe_replica(self), "steps_run": self.denoiser.steps_run}
