"""TextEncoder deployment: prompt -> embeddings. Holds the tokenizer(s) and text encoder(s) only."""

from __future__ import annotations

import torch

from serve_app.deployments.replica import ModelStage
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.encoders import PromptEncoder
from serve_app.pipeline.types import PromptEmbeddings


class TextEncoder(ModelStage):
    stage = "text_encoder"

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        self.encoder = PromptEncoder(layout, device, dtype)

    async def encode(self, prompt: str, count_prompt: str | None = None) -> PromptEmbeddings:
        # Computes on the event-loop thread, as the other model stages do (see replica.use_torch_threads).
        self.ready()
        return self.encoder.encode(prompt, count_prompt=count_prompt)

    def probe(self) -> bool:
        return self.encoder.probe()
