"""What the architecture tests share: an architecture's three stages held
apart as three replicas would hold them, and the comparisons against
diffusers' own pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import DenoiseJob


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads wait on
    each other and run these tiny matmuls an order of magnitude slower.
    Autouse in every module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Stages:
    """Three instances of an architecture, each holding only its own stage's components."""

    def __init__(self, architecture, model_dir):
        self.layout = layout = PipelineLayout.read(model_dir)
        self.text, self.denoiser, self.vae = (architecture(layout) for _ in range(3))
        self.text.load_text()
        self.denoiser.load_denoiser()
        self.vae.load_vae()

    def latents(self, jobs, preview_steps=frozenset()):
        return list(self.denoiser.denoise(jobs, set(preview_steps), every_step=False))

    def generate(self, job: DenoiseJob) -> np.ndarray:
        kind, latents = self.latents([job])[-1]
        assert kind == "final"
        return self.vae.decode(latents)


def pipeline_pixels(pipe, seeds: list[int], **kwargs) -> np.ndarray:
    """diffusers' own pipeline, one CPU generator per image, as the uint8 its PIL output would hold."""
    out = pipe(generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np", **kwargs).images
    return (out * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def assert_not_flat(pixels: np.ndarray) -> None:
    # Random weights could saturate every pixel; then equal images would prove nothing.
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50
