"""Stable Diffusion XL (and its img2img and inpainting checkpoints).

Stable Diffusion with SDXL's text conditioning: the penultimate hidden
states of two CLIP text encoders side by side, the second's pooled
(projected) output, and six "added time ids" (original size, crop
top-left, target size) as extra UNet conditioning. Refiner checkpoints
(aesthetic-score time ids) are not served.
"""

from __future__ import annotations

import torch

from serve_app.pipeline.architectures.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    text_encoder_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    def _embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            out = encoder(self._tokenize(tokenizer, text), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def _added_conditioning(self, jobs, guided, per_image):
        first = jobs[0]
        pooled = per_image("pooled_prompt_embeds")
        if guided:
            pooled = torch.cat([per_image("negative_pooled_prompt_embeds"), pooled])
        # original size, crop top-left, target size
        time_ids = torch.tensor([[first.height, first.width, 0, 0, first.height, first.width]], dtype=self.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.to(self.device).repeat(pooled.shape[0], 1)}

    def _probe_conditioning(self):
        config = self.unet.config
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {
            "text_embeds": torch.zeros(1, pooled_dim, device=self.device, dtype=self.dtype),
            "time_ids": torch.zeros(1, 6, device=self.device, dtype=self.dtype),
        }
