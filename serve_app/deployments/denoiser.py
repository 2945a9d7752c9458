"""Denoiser deployment: embeddings + seeds -> latents. Holds the denoising network (UNet or transformer) and scheduler only."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import numpy as np
import torch

from serve_app.deployments.batching import BatchRunner
from serve_app.deployments.replica import ModelStage, optimize_modules
from serve_app.metrics import STEP_SECONDS
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.types import DenoiseJob

PREVIEW_SEND_S = 0.02  # loop time given to send a preview before the next step


class Denoiser(ModelStage):
    stage = "denoiser"

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        self.denoiser = LatentDenoiser(layout, device, dtype)
        optimize_modules(self.denoiser.arch, self.options, device)
        self.denoiser.on_step = STEP_SECONDS.observe
        self.batches = BatchRunner("denoiser", self.denoiser.denoise_many_steps, self.options, stepwise=True)

    async def denoise(self, job: DenoiseJob) -> np.ndarray:
        self.ready()
        self.denoiser.check(job)
        return await self.batches.run(job, len(job.seeds))

    async def denoise_stream(self, job: DenoiseJob, partial_images: int) -> AsyncIterator[tuple[str, np.ndarray]]:
        """Streamed to the caller (handle.options(stream=True)): previews as they happen, then the result.

        Steps compute on the event-loop thread, like batches (running them on
        a worker thread was measured to slow every later compute of the
        replica: PyTorch's OpenMP pool then stopped using both cores). After a
        preview the loop is given a moment to send it before the next step
        blocks it.
        """
        self.ready()
        self.denoiser.check(job)
        for kind, latents in self.denoiser.denoise_steps(job, partial_images):
            yield kind, latents
            if kind == "preview":
                await asyncio.sleep(PREVIEW_SEND_S)

    def probe(self) -> bool:
        return self.denoiser.probe()

    def describe(self) -> dict[str, Any]:
        steps = self.denoiser.steps_run if hasattr(self, "denoiser") else 0
        return {**super().describe(), "steps_run": steps, "last_batch_cpu_per_wall": self.batches.last_cpu_per_wall if hasattr(self, "batches") else None}
