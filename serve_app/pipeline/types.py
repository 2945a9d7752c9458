"""Small data classes that cross deployment boundaries: NumPy arrays and plain values.

Ray moves NumPy arrays between processes without copying them through
pickle, and they carry no device: a CUDA tensor never leaves its stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptEmbeddings:
    """What the text encoder hands the denoiser for one prompt."""

    prompt_embeds: np.ndarray  # (1, tokens, dim) float32
    negative_prompt_embeds: np.ndarray  # (1, tokens, dim) float32, for classifier-free guidance
    pooled_prompt_embeds: np.ndarray | None = None  # (1, dim), SDXL only
    negative_pooled_prompt_embeds: np.ndarray | None = None  # (1, dim), SDXL only
    token_count: int = 0  # prompt tokens in the model's tokenizer, before truncation
    truncated: bool = False  # True when the prompt was cut at the encoder's window
    encoded_prompt: str = ""  # the text actually encoded (after truncation)


@dataclass
class DenoiseJob:
    """One prompt, ``len(seeds)`` images of one size."""

    embeddings: PromptEmbeddings
    seeds: list[int]
    height: int
    width: int
    steps: int
    guidance: float
