"""Stage 2: text embeddings + seeds -> denoised latents."""

from __future__ import annotations

import json

import numpy as np
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.sources import SourceFiles
from serve_app.pipeline.types import DenoiseJob


class LatentDenoiser:
    """Loads only the UNet and the scheduler of a pipeline."""

    # The VAE's config gives the latent grid's downsampling factor (below).
    SOURCE_FILES = SourceFiles("denoiser", ("model_index.json", "unet/*", "scheduler/*", "vae/config.json"))

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.unet = layout.load("unet", dtype=dtype, device=device)
        self.scheduler = layout.load("scheduler")
        # The latent grid is the image divided by the VAE's downsampling
        # factor; read it from the VAE's config without loading the VAE.
        vae_config = json.loads((layout.root / "vae" / "config.json").read_text())
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.latent_channels = self.unet.config.in_channels

    def loaded_components(self) -> list[str]:
        return ["unet", "scheduler"]

    def initial_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Per-image noise drawn on the CPU from each image's own generator, as
        diffusers does with a list of generators: an image depends only on its
        seed, not on the device or on which other images share its batch."""
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)

    @torch.inference_mode()
    def denoise(self, job: DenoiseJob) -> np.ndarray:
        n = len(job.seeds)
        emb = job.embeddings
        guided = job.guidance > 1.0

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(self.device, self.dtype).repeat_interleave(n, dim=0)

        # 1. Conditioning: unconditional first, then the prompt, as one batch.
        cond = t(emb.prompt_embeds)
        added: dict[str, torch.Tensor] | None = None
        if guided:
            cond = torch.cat([t(emb.negative_prompt_embeds), cond])
        if self.layout.is_sdxl:
            pooled = t(emb.pooled_prompt_embeds)
            if guided:
                pooled = torch.cat([t(emb.negative_pooled_prompt_embeds), pooled])
            # original size, crop top-left, target size
            time_ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]], dtype=self.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device).repeat(pooled.shape[0], 1)}

        # 2. A scheduler of its own per call: schedulers keep per-run state.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(job.steps, device=self.device)

        # 3. Initial noise from each image's seed.
        latents = self.initial_noise(job.seeds, job.height, job.width) * scheduler.init_noise_sigma

        # 4. Denoising loop with classifier-free guidance.
        for step_t in scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if guided else latents
            model_in = scheduler.scale_model_input(model_in, step_t)
            noise = self.unet(model_in, step_t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
            if guided:
                uncond, text = noise.chunk(2)
                noise = uncond + job.guidance * (text - uncond)
            latents = scheduler.step(noise, step_t, latents).prev_sample
        return latents.float().cpu().numpy()
