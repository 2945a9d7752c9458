"""Stage 1: prompt -> text embeddings (Stable Diffusion 1.x/2.x and SDXL)."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.sources import SourceFiles
from serve_app.pipeline.types import PromptEmbeddings


class PromptEncoder:
    """Loads only the tokenizer(s) and text encoder(s) of a pipeline."""

    SOURCE_FILES = SourceFiles("text_encoder", ("model_index.json", "tokenizer*/*", "text_encoder*/*"))

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.device = device
        self.encoders = [
            (layout.load(tok), layout.load(enc, dtype=dtype, device=device)) for tok, enc in layout.text_encoder_names
        ]

    def loaded_components(self) -> list[str]:
        return [name for pair in self.layout.text_encoder_names for name in pair]

    def _tokenize(self, tokenizer, text: str) -> torch.Tensor:
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def _embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states to condition on and, for SDXL, the pooled embedding."""
        if not self.layout.is_sdxl:
            tokenizer, encoder = self.encoders[0]
            return encoder(self._tokenize(tokenizer, text))[0], None
        # 2. SDXL: penultimate hidden states of both encoders, side by side;
        # the pooled (projected) output of the last one.
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            out = encoder(self._tokenize(tokenizer, text), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def probe(self) -> bool:
        """Encode the empty prompt; True when the embeddings are finite."""
        embeds = self.encode("")
        return bool(np.isfinite(embeds.prompt_embeds).all())

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None) -> PromptEmbeddings:
        """``count_prompt`` is the text whose tokens are reported (the user's
        prompt, when ``prompt`` is it wrapped in a template)."""
        # 1. Count tokens and find what the encoder's window keeps.
        tokenizer = self.encoders[0][0]
        window = tokenizer.model_max_length - 2  # minus start and end tokens
        text_ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
        truncated = len(text_ids) > window
        encoded_prompt = kept_text(tokenizer, prompt, window) if truncated else prompt
        counted = text_ids if count_prompt is None else tokenizer(count_prompt, truncation=False, add_special_tokens=False).input_ids

        # 2. Encode the prompt, then 3. the negative prompt for guidance.
        embeds, pooled = self._embed(prompt)
        if self.layout.force_zeros_for_empty_prompt and not negative_prompt:
            neg_embeds = torch.zeros_like(embeds)
            neg_pooled = None if pooled is None else torch.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = self._embed(negative_prompt)

        def to_np(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.float().cpu().numpy()

        return PromptEmbeddings(
            prompt_embeds=to_np(embeds),
            negative_prompt_embeds=to_np(neg_embeds),
            pooled_prompt_embeds=to_np(pooled),
            negative_pooled_prompt_embeds=to_np(neg_pooled),
            token_count=len(counted),
            truncated=truncated,
            encoded_prompt=encoded_prompt,
        )


def kept_text(tokenizer, text: str, window: int) -> str:
    """The part of ``text``, as written, whose tokens fit the encoder's
    window: cut where the window's last token ends, at a character boundary.
    (Decoding the kept tokens instead gives the tokenizer's normal form:
    lowercased, punctuation spaced out.)"""
    if getattr(tokenizer, "is_fast", False):
        # Character offsets of each token in the original text.
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[: offsets[window - 1][1]] if len(offsets) > window else text

    # A slow tokenizer has no offsets: the longest prefix whose tokens fit,
    # by bisection. A longer prefix can merge into fewer tokens, so this
    # finds a prefix that fits, at worst a few characters short of the longest.
    def fits(end: int) -> bool:
        return len(tokenizer(text[:end], add_special_tokens=False).input_ids) <= window

    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip()
