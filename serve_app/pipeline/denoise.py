"""Stage 2: text embeddings + seeds -> denoised latents, for any architecture.

The architecture runs the loop for one batch of like jobs; this stage
groups the jobs of a batch by what can run together, counts and times
steps, and offers the loop as a generator that yields between steps so
that its caller can stop it (cancellation) or send previews.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob, preview_steps


class LatentDenoiser:
    """Loads only the denoising network and the scheduler of a pipeline."""

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.arch = architecture_for(layout)(layout, device, dtype)
        self.arch.load_denoiser()
        self.steps_run = 0  # denoising steps done by this replica, for tests and metrics
        self.on_step: Callable[[float], None] | None = None  # called with each step's seconds

    def probe(self) -> bool:
        """One forward pass on the smallest input with empty conditioning; True when finite."""
        return self.arch.probe_denoiser()

    def steps_for(self, job: DenoiseJob) -> int:
        return self.arch.steps_for(job)

    def check(self, job: DenoiseJob) -> None:
        """Raise ``NeedsInputImage`` for a job this model cannot run (a text-to-image
        job on an inpainting-only model); the deployment asks before the job
        joins a batch, so that it fails alone."""
        self.arch.check_job(job)

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        return self.denoise_many([job])[0]

    def denoise_many(self, jobs: list[DenoiseJob]) -> list[np.ndarray]:
        """Denoise several jobs, running those that share a batch key as one
        batch. Each image still depends only on its own seed (up to
        floating-point differences between batch sizes)."""
        for out in self.denoise_many_steps(jobs):
            pass
        return out  # type: ignore[return-value]

    def denoise_many_steps(self, jobs: list[DenoiseJob]) -> Iterator[list[np.ndarray] | None]:
        """:meth:`denoise_many`, yielding None after every denoising step and
        the results last, so that a caller can stop between steps."""
        results: list[np.ndarray | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key(), []).append(i)
        for indices in groups.values():
            for kind, latents in self._run([jobs[i] for i in indices], set()):
                if kind == "step":
                    yield None
            offset = 0
            for i in indices:
                n = len(jobs[i].seeds)
                results[i] = latents[offset : offset + n]
                offset += n
        yield results  # type: ignore[misc]

    def denoise_steps(self, job: DenoiseJob, partial_images: int) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ("preview", predicted clean latents) ``partial_images`` times,
        evenly spaced over the steps the job runs, then ("final", latents)."""
        for kind, latents in self._run([job], set(preview_steps(self.steps_for(job), partial_images))):
            if kind != "step":
                yield kind, latents

    def _run(self, jobs: list[DenoiseJob], preview_steps: set[int]) -> Iterator[tuple[str, np.ndarray | None]]:
        for job in jobs:
            self.check(job)
        started = time.perf_counter()
        for kind, latents in self.arch.denoise(jobs, preview_steps, every_step=True):
            if kind == "step":
                self.steps_run += 1
                now = time.perf_counter()
                if self.on_step is not None:
                    self.on_step(now - started)
                started = now
            yield kind, latents
