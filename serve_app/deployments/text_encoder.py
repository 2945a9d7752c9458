"""TextEncoder deployment: prompt -> embeddings. Holds the tokenizer(s) and text encoder(s) only."""

from __future__ import annotations

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.replica import describe_replica, prepare_replica
from serve_app.pipeline.encoders import PromptEncoder
from serve_app.pipeline.types import PromptEmbeddings


class TextEncoder:
    def __init__(self, pipeline: PipelineConfig, options: StageOptions):
        layout, device, dtype = prepare_replica(pipeline, options)
        self.encoder = PromptEncoder(layout, device, dtype)

    def encode(self, prompt: str, count_prompt: str | None = None) -> PromptEmbeddings:
        return self.encoder.encode(prompt, count_prompt=count_prompt)

    def describe(self) -> dict:
        return describe_replica(self)
