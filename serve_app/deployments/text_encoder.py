"""TextEncoder deployment: prompt -> embeddings. Holds the tokenizer(s) and text encoder(s) only."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.deployments.replica import ModelStage
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.encoders import PromptEncoder
from serve_app.pipeline.types import EditInputs, PromptEmbeddings


class TextEncoder(ModelStage):
    stage = "text_encoder"

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> PromptEncoder:
        return PromptEncoder(layout, device, dtype)

    async def encode(
        self,
        prompt: str,
        count_prompt: str | None = None,
        images: list[np.ndarray] | None = None,
        pipeline: str | None = None,
    ) -> PromptEmbeddings:
        # Computes on the event-loop thread, as the other model stages do (see replica.use_torch_threads).
        return self.ready(pipeline).model.encode(prompt, count_prompt=count_prompt, images=images)

    async def edit_inputs(self, pipeline: str | None = None) -> EditInputs:
        """What this model's edits take (its architecture's rule), for the ingress."""
        return self.ready(pipeline).model.edit_inputs()
