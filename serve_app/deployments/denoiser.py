"""Denoiser deployment: embeddings + seeds -> latents. Holds the denoising network (UNet or transformer) and scheduler only."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import numpy as np
import torch

from serve_app.deployments.replica import ModelStage, optimize_modules
from serve_app.metrics import STEP_SECONDS
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.types import DenoiseJob

PREVIEW_SEND_S = 0.02  # loop time given to send a preview before the next step


class Denoiser(ModelStage):
    stage = "denoiser"
    batch_method = "denoise_many_steps"
    stepwise = True

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> LatentDenoiser:
        denoiser = LatentDenoiser(layout, device, dtype)
        optimize_modules(denoiser.arch, self.options, device)
        denoiser.on_step = STEP_SECONDS.observe
        return denoiser

    async def denoise(self, job: DenoiseJob, pipeline: str | None = None) -> np.ndarray:
        member = self.ready(pipeline)
        member.model.check(job)
        return await member.batches.run(job, len(job.seeds))

    async def denoise_stream(
        self, job: DenoiseJob, partial_images: int, pipeline: str | None = None
    ) -> AsyncIterator[tuple[str, np.ndarray]]:
        """Streamed to the caller (handle.options(stream=True)): previews as they happen, then the result.

        Steps compute on the event-loop thread, like batches (running them on
        a worker thread was measured to slow every later compute of the
        replica: PyTorch's OpenMP pool then stopped using both cores). After a
        preview the loop is given a moment to send it before the next step
        blocks it.
        """
        denoiser = self.ready(pipeline).model
        denoiser.check(job)
        for kind, latents in denoiser.denoise_steps(job, partial_images):
            yield kind, latents
            if kind == "preview":
                await asyncio.sleep(PREVIEW_SEND_S)

    def describe(self, pipeline: str | None = None) -> dict[str, Any]:
        model = self._member(pipeline).model
        return {**super().describe(pipeline), "steps_run": getattr(model, "steps_run", 0)}
