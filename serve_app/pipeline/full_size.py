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


def offline_tokenizer(class_name: str, config: dict[str, Any]):
    """A tokenizer of this class built with no download (the vocabularies of
    the tiny models), with the window its published config gives. Its ids
    are a small subset of the real vocabulary: enough for a benchmark, where
    only the shapes matter."""
    from serve_app.pipeline import tiny

    window = config.get("model_max_length")
    if class_name.startswith("CLIPTokenizer"):
        return tiny.byte_level_clip_tokenizer(window or 77)
    if class_name.startswith("T5Tokenizer"):
        return tiny.t5_unigram_tokenizer(window or 512)
    if class_name.startswith("Qwen2Tokenizer"):
        return tiny.qwen2_byte_level_tokenizer()
    raise NotImplementedError(f"no offline builder for a {class_name}")


def save_random_pipeline(root: str | Path, target: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A pipeline directory with ``root``'s classes and sizes and random
    weights: a real-size model for a benchmark, with no download. Each
    network is built from its config on ``device`` (a GPU initialises
    billions of parameters in seconds, a CPU in minutes) and saved in
    ``dtype``; tokenizers come from :func:`offline_tokenizer`. Written to a
    sibling folder and renamed, so a half-written model is never taken for one."""
    import json
    import shutil

    root, target = Path(root), Path(target)
    if (target / "model_index.json").exists():
        return target
    layout = PipelineLayout.read(root)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, (_, class_name) in sorted(layout.components.items()):
        module = build_component(layout, name, device)
        if module is None:
            config_file = root / name / "tokenizer_config.json"
            config = json.loads(config_file.read_text()) if config_file.exists() else {}
            offline_tokenizer(class_name, config).save_pretrained(str(partial / name))
        elif isinstance(module, torch.nn.Module):
            module.to(dtype).save_pretrained(str(partial / name))
            del module
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            module.save_pretrained(str(partial / name))  # a scheduler
    shutil.copy(root / "model_index.json", partial / "model_index.json")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
