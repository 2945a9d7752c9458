"""One module per model architecture, and the registry from a pipeline's
``model_index.json`` ``_class_name`` to the architecture that serves it.

Adding an architecture: its module (an :class:`Architecture` subclass), its
tiny builder in :mod:`serve_app.pipeline.tiny`, its tests, and one line in
``ARCHITECTURES`` below.
"""

from __future__ import annotations

import importlib

from serve_app.pipeline.architectures.base import Architecture
from serve_app.pipeline.components import ModelLayoutError, PipelineLayout

# Each architecture ("module:class" in this package) and the model_index.json
# `_class_name` values it serves. A module is imported when a pipeline of its
# architecture loads: the FLUX, Qwen-Image and Z-Image modules import
# diffusers' pipelines (seconds of CPU in every replica that would not use
# them, and stand-in stages that load no model need none of it).
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "sd:StableDiffusion": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl:StableDiffusionXL": (
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    ),
    "sd3:SD3Architecture": (
        "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
    ),
    "flux:FluxArchitecture": ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    "flux:FluxFillArchitecture": ("FluxFillPipeline",),
    "flux:FluxKontextArchitecture": ("FluxKontextPipeline",),
    "flux2:Flux2KleinArchitecture": ("Flux2KleinPipeline",),
    "qwen_image:QwenImageArchitecture": ("QwenImagePipeline",),
    "qwen_image:QwenImageEditArchitecture": ("QwenImageEditPipeline",),
    "qwen_image:QwenImageEditPlusArchitecture": ("QwenImageEditPlusPipeline",),
    "z_image:ZImageArchitecture": ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
}

_BY_CLASS = {name: arch for arch, names in ARCHITECTURES.items() for name in names}


def load_architecture(path: str) -> type[Architecture]:
    """An ``ARCHITECTURES`` key ("module:class") -> the class."""
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def architecture_for(layout: PipelineLayout) -> type[Architecture]:
    """The architecture that serves a pipeline directory, by its ``_class_name``."""
    path = _BY_CLASS.get(layout.pipeline_class)
    if path is None:
        raise ModelLayoutError(
            f"{layout.root}: pipeline class {layout.pipeline_class!r} is not supported; expected one of {sorted(_BY_CLASS)}"
        )
    arch = load_architecture(path)
    for needed in arch.required_components:
        if needed not in layout.components:
            raise ModelLayoutError(f"{layout.root}: model_index.json lists no {needed!r} component")
    return arch
