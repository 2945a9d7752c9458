"""One module per model architecture, and the registry from a pipeline's
``model_index.json`` ``_class_name`` to the architecture that serves it.

Adding an architecture: its module (an :class:`Architecture` subclass), its
tiny builder in :mod:`serve_app.pipeline.tiny`, its tests, and one line in
``ARCHITECTURES`` below.
"""

from __future__ import annotations

from serve_app.pipeline.architectures.base import Architecture
from serve_app.pipeline.architectures.flux import FluxArchitecture, FluxFillArchitecture, FluxKontextArchitecture
from serve_app.pipeline.architectures.flux2 import Flux2KleinArchitecture
from serve_app.pipeline.architectures.qwen_image import (
    QwenImageArchitecture,
    QwenImageEditArchitecture,
    QwenImageEditPlusArchitecture,
)
from serve_app.pipeline.architectures.sd import StableDiffusion
from serve_app.pipeline.architectures.sd3 import SD3Architecture
from serve_app.pipeline.architectures.sdxl import StableDiffusionXL
from serve_app.pipeline.architectures.z_image import ZImageArchitecture
from serve_app.pipeline.components import ModelLayoutError, PipelineLayout

ARCHITECTURES: tuple[type[Architecture], ...] = (
    StableDiffusion, StableDiffusionXL, SD3Architecture,
    FluxArchitecture, FluxFillArchitecture, FluxKontextArchitecture, Flux2KleinArchitecture,
    QwenImageArchitecture, QwenImageEditArchitecture, QwenImageEditPlusArchitecture, ZImageArchitecture,
)

_BY_CLASS = {name: arch for arch in ARCHITECTURES for name in arch.pipeline_classes}


def architecture_for(layout: PipelineLayout) -> type[Architecture]:
    """The architecture that serves a pipeline directory, by its ``_class_name``."""
    arch = _BY_CLASS.get(layout.pipeline_class)
    if arch is None:
        raise ModelLayoutError(
            f"{layout.root}: pipeline class {layout.pipeline_class!r} is not supported; expected one of {sorted(_BY_CLASS)}"
        )
    for needed in arch.required_components:
        if needed not in layout.components:
            raise ModelLayoutError(f"{layout.root}: model_index.json lists no {needed!r} component")
    return arch
