"""Real-size models from their configs alone, with no weights.

``configs/full-size/<name>/`` holds the published component configs of real
checkpoints (``model_index.json`` and each component's config, no weights).
Each component is built here by its own class from its config on PyTorch's
``meta`` device, which allocates no memory, so its parameter count (and the
memory its weights need) is known on any machine; a GPU benchmark builds the
same classes on a real device to get random weights of the real size.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from serve_app.pipeline.components import PipelineLayout

FULL_SIZE_DIR = Path(__file__).resolve().parents[2] / "configs" / "full-size"


def build_component(layout: PipelineLayout, name: str, device: str | torch.device = "meta") -> Any:
    """One component of a pipeline directory built by its own class from its
    config alone: a network with random (on ``meta``: unallocated) weights, or
    a scheduler. None for a tokenizer, whose vocabulary is not a config."""
    library, class_name = layout.components[name]
    cls = getattr(importlib.import_module(library), class_name)
    folder = str(layout.root / name)
    if library == "diffusers":
        config = cls.load_config(folder)
        if not issubclass(cls, torch.nn.Module):
            return cls.from_config(config)  # a scheduler
        with torch.device(device):
            return cls.from_config(config)
    if not issubclass(cls, torch.nn.Module):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        return cls(config)


def parameter_counts(root: str | Path) -> dict[str, int]:
    """Parameters of each neural-network component of a pipeline directory, built on ``meta``."""
    layout = PipelineLayout.read(root)
    counts = {}
    for name in sorted(layout.components):
        module = build_component(layout, name)
        if isinstance(module, torch.nn.Module):
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts
