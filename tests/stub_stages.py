"""Model stages that sleep instead of computing, for fault tests on the real graph.

They are the real deployment classes (TextEncoder, Denoiser, VaeDecoder) with
only the model swapped for a stand-in: batching, cancellation between steps,
readiness, health checks and every Ray Serve mechanism stay the real ones,
while a request costs sleep, not CPU, so bursts of many requests fit a
2-core machine and a test's timing does not depend on the machine's load.

``stub_model_stages(step_s=..., load_s=...)`` returns the classes to pass as
``build_graph(args, model_stages=...)``. Outputs are deterministic in the seed
and have the real shapes (latents 1/8 of the image, uint8 RGB pixels).
"""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from serve_app.deployments.denoiser import Denoiser
from serve_app.deployments.text_encoder import TextEncoder
from serve_app.deployments.vae_decoder import VaeDecoder
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob, EditInputs, EditLatents, PromptEmbeddings, preview_steps

if TYPE_CHECKING:
    from ray.serve import Application

LATENT_CHANNELS = 4
SCALE = 8


class SleepyEncoder:
    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None, images=None) -> PromptEmbeddings:
        rng = np.random.default_rng(zlib.crc32(prompt.encode()))
        embeds = rng.standard_normal((1, 8, 16), dtype=np.float32)
        return PromptEmbeddings(
            prompt_embeds=embeds,
            negative_prompt_embeds=np.zeros_like(embeds),
            token_count=len((count_prompt if count_prompt is not None else prompt).split()),
            encoded_prompt=prompt,
        )

    def edit_inputs(self) -> EditInputs:
        return EditInputs()

    def probe(self) -> bool:
        return True


class SleepyDenoiser:
    """Sleeps ``step_s`` per denoising step (blocking, as real compute does)."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.steps_run = 0

    def _latents(self, job: DenoiseJob) -> np.ndarray:
        shape = (LATENT_CHANNELS, job.height // SCALE, job.width // SCALE)
        return np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in job.seeds])

    def _step(self) -> None:
        time.sleep(self.step_s)
        self.steps_run += 1

    def check(self, job: DenoiseJob) -> None:
        """The stand-in model runs any job (LatentDenoiser.check refuses some)."""

    def denoise_many_steps(self, jobs: list[DenoiseJob]) -> Iterator[list[np.ndarray] | None]:
        for _ in range(max(j.steps for j in jobs)):
            self._step()
            yield None
        yield [self._latents(j) for j in jobs]

    def denoise_steps(self, job: DenoiseJob, partial_images: int) -> Iterator[tuple[str, np.ndarray]]:
        previews = preview_steps(job.steps, partial_images)
        for i in range(1, job.steps + 1):
            self._step()
            if i in previews:
                yield "preview", self._latents(job)
        yield "final", self._latents(job)

    def probe(self) -> bool:
        return True


class SleepyDecoder:
    def __init__(self, batch_s: float):
        self.batch_s = batch_s

    def decode_many(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.batch_s)
        return [self.decode(latents) for latents in batch]

    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None, references=None) -> EditLatents:
        """The VAE encoder's stand-in: latents of the real shape, derived from the pixels."""
        h, w = pixels.shape[0] // SCALE, pixels.shape[1] // SCALE
        mean = np.broadcast_to(pixels[::SCALE, ::SCALE, :1].transpose(2, 0, 1) / 255.0, (LATENT_CHANNELS, h, w))
        latents = EditLatents(mean=np.ascontiguousarray(mean[None], np.float32), std=np.zeros((1, LATENT_CHANNELS, h, w), np.float32))
        if alpha is not None:
            latents.mask = (alpha[::SCALE, ::SCALE] < 128).astype(np.float32)[None, None]
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        n, _, h, w = latents.shape
        gray = ((latents[:, 0] > 0) * 255).astype(np.uint8).repeat(SCALE, 1).repeat(SCALE, 2)
        return np.ascontiguousarray(np.broadcast_to(gray[..., None], (n, h * SCALE, w * SCALE, 3)))

    def probe(self) -> bool:
        return True


def stub_model_stages(step_s: float = 0.05, decode_s: float = 0.02, load_s: float = 0.0) -> dict[str, type]:
    """The three model stage classes with sleeping models; ``load_s`` is how
    long each replica takes to "load" (in its constructor, as a real one does)."""

    class StubTextEncoder(TextEncoder):
        def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> SleepyEncoder:
            time.sleep(load_s)
            return SleepyEncoder()

    class StubDenoiser(Denoiser):
        def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> SleepyDenoiser:
            time.sleep(load_s)
            return SleepyDenoiser(step_s)

    class StubVaeDecoder(VaeDecoder):
        def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> SleepyDecoder:
            time.sleep(load_s)
            return SleepyDecoder(decode_s)

    return {"text_encoder": StubTextEncoder, "denoiser": StubDenoiser, "vae_decoder": StubVaeDecoder}


def build_app(args: dict) -> "Application":
    """A Serve builder for configs deployed with ``serve deploy``
    (``import_path: tests.stub_stages:build_app``): the shipped builder,
    ``serve_app.app.build_graph``, with sleeping model stages. ``args`` are
    the application's own, plus ``stub_models``: keyword arguments of
    :func:`stub_model_stages` (step_s, decode_s, load_s)."""
    from serve_app.app import build_graph

    args = dict(args)
    stub = args.pop("stub_models", {})
    return build_graph(args, model_stages=stub_model_stages(**stub))
