"""Denoiser deployment: embeddings + seeds -> latents. Holds the UNet and scheduler only."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.batching import BatchRunner
from serve_app.deployments.replica import describe_replica, optimize_module, prepare_replica
from serve_app.metrics import STEP_SECONDS
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.types import DenoiseJob


class Denoiser:
    def __init__(self, pipeline: PipelineConfig, options: StageOptions):
        layout, device, dtype = prepare_replica(pipeline, options)
        self.denoiser = LatentDenoiser(layout, device, dtype)
        self.denoiser.unet = optimize_module(self.denoiser.unet, options, device)
        self.denoiser.on_step = STEP_SECONDS.observe
        self.batches = BatchRunner("denoiser", self.denoiser.denoise_many, options)

    async def denoise(self, job: DenoiseJob) -> np.ndarray:
        return await self.batches.run(job, len(job.seeds))

    def denoise_stream(self, job: DenoiseJob, preview_steps: list[int]) -> Iterator[tuple[str, np.ndarray]]:
        """Streamed to the caller (handle.options(stream=True)): previews as they happen, then the result."""
        yield from self.denoiser.denoise_steps(job, preview_steps)

    def describe(self) -> dict:
        return {**describe_replica(self), "steps_run": self.denoiser.steps_run}
