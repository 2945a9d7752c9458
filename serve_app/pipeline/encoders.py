"""Stage 1: prompt -> text embeddings, for any architecture."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.types import EditInputs, PromptEmbeddings


class PromptEncoder:
    """Loads only the tokenizer(s) and text encoder(s) of a pipeline."""

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.arch = architecture_for(layout)(layout, device, dtype)
        self.arch.load_text()

    def encode(
        self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None, images: list[np.ndarray] | None = None
    ) -> PromptEmbeddings:
        """``count_prompt`` is the text whose tokens are reported (the user's
        prompt, when ``prompt`` is it wrapped in a template); ``images``, an
        edit's input images, for architectures whose text stage sees them."""
        if images is not None and self.arch.edit_inputs.text_sees_images:
            return self.arch.encode(prompt, negative_prompt, count_prompt, images=images)
        return self.arch.encode(prompt, negative_prompt, count_prompt)

    def edit_inputs(self) -> EditInputs:
        return self.arch.edit_inputs

    def probe(self) -> bool:
        """Encode the empty prompt; True when the embeddings are finite."""
        return self.arch.probe_text()
