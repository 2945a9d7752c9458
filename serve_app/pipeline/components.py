"""Reading a diffusers pipeline directory and loading only chosen components.

``model_index.json`` names each component's library and class, e.g.
``"unet": ["diffusers", "UNet2DConditionModel"]``. Each stage loads just the
components it needs with that class's own ``from_pretrained(root,
subfolder=name)``, the same code path ``DiffusionPipeline.from_pretrained``
takes, so any real SD 1.x/2.x or SDXL directory works unchanged.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

class ModelLayoutError(RuntimeError):
    """The directory is not a usable diffusers pipeline of an architecture we serve."""


@dataclass(frozen=True)
class PipelineLayout:
    root: Path
    pipeline_class: str
    components: dict[str, tuple[str, str]]  # name -> (library, class)
    force_zeros_for_empty_prompt: bool
    # FLUX.2 [klein]'s distilled checkpoints: no classifier-free guidance.
    is_distilled: bool = False

    @classmethod
    def read(cls, root: str | Path) -> "PipelineLayout":
        root = Path(root)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise ModelLayoutError(f"{root}: no model_index.json; expected a diffusers pipeline directory")
        index = json.loads(index_path.read_text())
        pipeline_class = index.get("_class_name", "")
        components = {
            k: (v[0], v[1])
            for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]
        }
        return cls(
            root=root,
            pipeline_class=pipeline_class,
            components=components,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
            is_distilled=bool(index.get("is_distilled", False)),
        )

    def component_config(self, name: str) -> dict[str, Any]:
        """A component's config.json, read without loading its weights."""
        path = self.root / name / "config.json"
        if not path.is_file():
            raise ModelLayoutError(f"{self.root}: {name}/config.json is missing")
        return json.loads(path.read_text())

    def load(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
        """Load one component with its own class's from_pretrained."""
        if name not in self.components:
            raise ModelLayoutError(f"{self.root}: no component {name!r}")
        library, class_name = self.components[name]
        if not (self.root / name).is_dir():
            raise ModelLayoutError(f"{self.root}: component folder {name}/ is missing")
        cls = getattr(importlib.import_module(library), class_name)
        kwargs: dict[str, Any] = {"subfolder": name}
        if hasattr(cls, "to") and dtype is not None:
            kwargs["torch_dtype"] = dtype
        obj = cls.from_pretrained(str(self.root), **kwargs)
        if isinstance(obj, torch.nn.Module):
            obj = obj.to(device).eval().requires_grad_(False)
        return obj


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    # Half precision on CPU is slow and, for some ops, missing; run float32 there.
    if device == "cpu":
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
