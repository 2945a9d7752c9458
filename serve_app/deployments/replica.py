"""What every model stage does when its replica starts."""

from __future__ import annotations

import logging
from typing import Any

import torch

from serve_app.config import PipelineConfig, StageOptions
from serve_app.pipeline.components import PipelineLayout, pick_device, pick_dtype
from serve_app.pipeline.tiny import save_tiny_pipeline

logger = logging.getLogger("serve_app")


def prepare_replica(pipeline: PipelineConfig, options: StageOptions) -> tuple[PipelineLayout, str, torch.dtype]:
    """Set torch's threads, make sure the model is on disk, pick device and dtype.

    Ray sets OMP_NUM_THREADS to the actor's num_cpus (one thread for
    fractional CPUs), which made a prototype of this graph 2.7x slower than
    one process; the thread count is therefore always set from config.
    """
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    if pipeline.builtin and not (pipeline.path / "model_index.json").exists():
        logger.info("building the embedded %s model at %s", pipeline.builtin, pipeline.path)
        save_tiny_pipeline(pipeline.path, pipeline.builtin)
    device = pick_device(options.device)
    return PipelineLayout.read(pipeline.path), device, pick_dtype(pipeline.dtype, device)


def held_module_classes(obj: Any) -> list[str]:
    """Class names of the torch modules an object holds (attributes, and
    containers of them, a few levels deep). Used to prove that a stage
    loaded only its own components."""
    found: set[str] = set()

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.nn.Module):
            found.add(type(value).__name__)
        elif depth > 0 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth - 1)
        elif depth > 0 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth - 1)
        elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                visit(v, depth - 1)

    visit(obj, 5)
    return sorted(found)


def describe_replica(stage: Any) -> dict[str, Any]:
    """What a stage replica actually runs with, for tests and debugging."""
    return {"modules": held_module_classes(stage), "torch_threads": torch.get_num_threads()}


def optimize_module(module: torch.nn.Module, options: StageOptions, device: str) -> torch.nn.Module:
    """GPU-only speedups from config. diffusers already uses PyTorch's SDPA
    attention on torch >= 2, so nothing is needed for that here."""
    if device == "cpu":
        return module
    if options.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if options.compile:
        # Compile the forward in place so the module keeps its attributes
        # (config, dtype) that the stage code reads.
        module.forward = torch.compile(module.forward, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return module
