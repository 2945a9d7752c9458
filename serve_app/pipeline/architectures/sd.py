"""Stable Diffusion 1.x/2.x (and their img2img and inpainting checkpoints).

Text: one CLIP text encoder's last hidden states. Denoiser: a UNet with
classifier-free guidance over a discrete scheduler. VAE: AutoencoderKL, 8x
downsampling, 4 latent channels. Edits: image-to-image from the input's
latents; inpainting by blending the input's latents back outside the mask
after every step, or, for an inpainting UNet (9 input channels), by
concatenating the mask and the masked image's latents to its input.
SDXL (sdxl.py) differs only in its text conditioning.

The loop is our own rather than the pipeline's ``__call__``: it must stop
between steps (cancellation), yield previews, and batch jobs of different
requests; it follows diffusers' pipelines step for step, and the tests hold
it to their pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.pipeline.architectures.base import Architecture, kept_text, prompt_embeddings, repaint_mask, to_uint8, to_unit_range
from serve_app.pipeline.types import DenoiseJob, EditLatents, NeedsInputImage, PromptEmbeddings, edit_steps


class StableDiffusion(Architecture):
    text_files = ("model_index.json", "tokenizer*/*", "text_encoder*/*")
    # The VAE's config gives the latent grid (downsampling, channels, scaling).
    denoiser_files = ("model_index.json", "unet/*", "scheduler/*", "vae/config.json")
    # The UNet's config says whether edits need the masked image's latents (an inpainting UNet).
    vae_files = ("model_index.json", "vae/*", "unet/config.json")
    required_components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    # (tokenizer, text encoder) pairs whose embeddings are used, in order.
    text_encoder_pairs: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)

    def _read_latent_space(self) -> None:
        """The latent grid from the VAE's config, read without loading the VAE
        (the denoiser and VAE stages both have vae/config.json)."""
        vae = self.layout.component_config("vae")
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        self.vae_scaling_factor = vae.get("scaling_factor", 0.18215)
        self.latent_channels = vae.get("latent_channels", 4)

    @property
    def inpaint_unet(self) -> bool:
        """True for an inpainting UNet, whose input is the latents, the mask
        and the masked image's latents concatenated (4 + 1 + 4 = 9 channels)."""
        return self.layout.component_config("unet").get("in_channels", self.latent_channels) == 2 * self.latent_channels + 1

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        self.encoders = [
            (self.layout.load(tok), self.layout.load(enc, dtype=self.dtype, device=self.device))
            for tok, enc in self.text_encoder_pairs
            if enc in self.layout.components
        ]

    def _tokenize(self, tokenizer, text: str) -> torch.Tensor:
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def _embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states to condition on, and the pooled embedding where the architecture uses one."""
        tokenizer, encoder = self.encoders[0]
        return encoder(self._tokenize(tokenizer, text))[0], None

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None) -> PromptEmbeddings:
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

        return prompt_embeddings(
            embeds, neg_embeds, pooled, neg_pooled,
            token_count=len(counted), truncated=truncated, encoded_prompt=encoded_prompt,
        )

    def probe_text(self) -> bool:
        return bool(np.isfinite(self.encode("").prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def load_denoiser(self) -> None:
        self._read_latent_space()
        self.unet = self.layout.load("unet", dtype=self.dtype, device=self.device)
        self.scheduler = self.layout.load("scheduler")

    def _added_conditioning(self, jobs: list[DenoiseJob], guided: bool, per_image) -> dict[str, torch.Tensor] | None:
        """Extra UNet conditioning besides the text's hidden states (SDXL's pooled embedding and size ids)."""
        return None

    def _probe_conditioning(self) -> dict[str, torch.Tensor] | None:
        return None

    @torch.inference_mode()
    def probe_denoiser(self) -> bool:
        """One UNet forward on an 8x8 latent with empty conditioning; True when finite."""
        config = self.unet.config
        latents = torch.zeros(1, config.in_channels, 8, 8, device=self.device, dtype=self.dtype)
        cond = torch.zeros(1, 4, config.cross_attention_dim, device=self.device, dtype=self.dtype)
        out = self.unet(latents, 500, encoder_hidden_states=cond, added_cond_kwargs=self._probe_conditioning()).sample
        return bool(torch.isfinite(out).all())

    def initial_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Per-image noise drawn on the CPU from each image's own generator, as
        diffusers does with a list of generators: an image depends only on its
        seed, not on the device or on which other images share its batch."""
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)

    def check_job(self, job: DenoiseJob) -> None:
        if job.edit is None and self.inpaint_unet:
            raise NeedsInputImage("this pipeline's UNet is an inpainting UNet: it edits images and cannot generate from text alone")

    def steps_for(self, job: DenoiseJob) -> int:
        return job.steps if job.edit is None else edit_steps(job.steps, job.strength)

    def denoise(self, jobs: list[DenoiseJob], preview_steps: set[int], every_step: bool) -> Iterator[tuple[str, np.ndarray | None]]:
        # inference_mode is per thread and a generator may be resumed on
        # another thread, so it is entered per step, never across a yield.
        first = jobs[0]
        guided = first.guidance > 1.0
        with torch.inference_mode():
            cond, added, scheduler, timesteps, latents, edit = self._prepare(jobs, guided)

        # 4. Denoising loop with classifier-free guidance.
        for i, step_t in enumerate(timesteps, start=1):
            with torch.inference_mode():
                model_in = torch.cat([latents] * 2) if guided else latents
                model_in = scheduler.scale_model_input(model_in, step_t)
                if edit is not None and edit.unet_extra is not None:
                    # An inpainting UNet also sees the mask and the masked image.
                    model_in = torch.cat([model_in, edit.unet_extra], dim=1)
                noise = self.unet(model_in, step_t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
                if guided:
                    uncond, text = noise.chunk(2)
                    noise = uncond + first.guidance * (text - uncond)
                out = scheduler.step(noise, step_t, latents)
                latents = out.prev_sample
                if edit is not None and edit.blend_mask is not None:
                    # An ordinary UNet inpaints by putting the input back, noised
                    # to the next step's level, wherever the mask keeps it.
                    keep = edit.image_latents
                    if i < len(timesteps):
                        keep = scheduler.add_noise(keep, edit.noise, timesteps[i : i + 1])
                    latents = (1 - edit.blend_mask) * keep + edit.blend_mask * latents
                preview = None
                if i in preview_steps and i < len(timesteps):
                    # 5. A preview is the scheduler's estimate of the clean
                    # image at this step (the noisy latents where it gives none).
                    x0 = getattr(out, "pred_original_sample", None)
                    preview = (x0 if x0 is not None else latents).float().cpu().numpy()
            if preview is not None:
                yield "preview", preview
            if every_step:
                yield "step", None
        yield "final", latents.float().cpu().numpy()

    def _prepare(self, jobs: list[DenoiseJob], guided: bool):
        first = jobs[0]

        def per_image(field: str) -> torch.Tensor:
            # Each job's (1, ...) embedding repeated once per image, jobs in order.
            parts = [torch.from_numpy(getattr(j.embeddings, field)).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
            return torch.cat(parts).to(self.device, self.dtype)

        # 1. Conditioning: unconditional first, then the prompts, as one batch.
        cond = per_image("prompt_embeds")
        if guided:
            cond = torch.cat([per_image("negative_prompt_embeds"), cond])
        added = self._added_conditioning(jobs, guided, per_image)

        # 2. A scheduler of its own per call: schedulers keep per-run state.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(first.steps, device=self.device)

        # 3. Initial latents: noise from each image's seed, or for an edit the
        # input's latents noised to where the shortened schedule starts.
        if first.edit is None:
            seeds = [s for j in jobs for s in j.seeds]
            latents = self.initial_noise(seeds, first.height, first.width) * scheduler.init_noise_sigma
            return cond, added, scheduler, scheduler.timesteps, latents, None
        timesteps = _edit_timesteps(scheduler, first.steps, first.strength)
        edit = self._edit_state(jobs, guided)
        if len(timesteps) == 0:
            latents = edit.image_latents  # strength 0: the input itself
        elif first.edit.inpaint and first.strength >= 1.0:
            latents = edit.noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(edit.image_latents, edit.noise, timesteps[:1].repeat(len(edit.noise)))
        return cond, added, scheduler, timesteps, latents, edit

    def _edit_state(self, jobs: list[DenoiseJob], guided: bool) -> "_EditState":
        """Sample each image's latents and noise from its own seeded generator.

        The draws come in the order diffusers' img2img and inpaint pipelines
        make them with one generator per image: the input's latent sample,
        the initial noise, then (inpainting UNet) the masked image's latent
        sample; an inpainting UNet at full strength skips the first, as
        diffusers does. So each image depends only on its seed and the input,
        and a one-image edit matches diffusers' pipeline.
        """
        first = jobs[0]
        inpaint_unet = self.inpaint_unet
        skip_image_sample = inpaint_unet and first.strength >= 1.0
        image_latents, noise, masked, masks = [], [], [], []
        for job in jobs:
            e = job.edit
            assert e is not None
            shape = e.mean.shape
            mean, std = torch.from_numpy(e.mean), torch.from_numpy(e.std)
            for seed in job.seeds:
                g = torch.Generator("cpu").manual_seed(seed)
                sample = None if skip_image_sample else mean + std * torch.randn(shape, generator=g, dtype=torch.float32)
                noise.append(torch.randn(shape, generator=g, dtype=torch.float32))
                image_latents.append(self.vae_scaling_factor * (sample if sample is not None else mean))
                if inpaint_unet:
                    m_mean, m_std = torch.from_numpy(e.masked_mean), torch.from_numpy(e.masked_std)
                    masked.append(self.vae_scaling_factor * (m_mean + m_std * torch.randn(shape, generator=g, dtype=torch.float32)))
                if e.mask is not None:
                    masks.append(torch.from_numpy(e.mask))

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts).to(self.device, self.dtype)

        state = _EditState(image_latents=stack(image_latents), noise=stack(noise))
        if masks:
            mask = stack(masks)
            if inpaint_unet:
                extra = torch.cat([mask, stack(masked)], dim=1)
                state.unet_extra = torch.cat([extra] * 2) if guided else extra
            else:
                state.blend_mask = mask
        return state

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        self._read_latent_space()
        self._load_vae_module()

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(latents).to(self.device, self.vae_dtype)
        z = z / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        return to_uint8(self.vae.decode(z).sample)

    def _distribution(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        dist = self.vae.encode(image.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        height, width = pixels.shape[:2]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"image size {width}x{height} is not a multiple of the VAE's {self.vae_scale_factor}")
        image = to_unit_range(pixels)
        mean, std = self._distribution(image)
        inpaint_unet = self.inpaint_unet
        if alpha is None and inpaint_unet:
            # An inpainting UNet always takes a mask: without one, the whole image is repainted.
            alpha = np.zeros((height, width), np.uint8)
        if alpha is None:
            return EditLatents(mean=mean, std=std)
        # The mask at latent size (nearest, as diffusers' interpolate) and, for
        # an inpainting UNet, the image with the repainted region blanked.
        repaint = torch.from_numpy(repaint_mask(alpha))[None, None]
        mask = F.interpolate(repaint, size=(height // self.vae_scale_factor, width // self.vae_scale_factor))
        latents = EditLatents(mean=mean, std=std, mask=mask.numpy())
        if inpaint_unet:
            latents.masked_mean, latents.masked_std = self._distribution(image * (repaint < 0.5))
        return latents

    @torch.inference_mode()
    def probe_vae(self) -> bool:
        """Decode the smallest latent; True when the pixels are finite."""
        z = torch.zeros(1, self.vae.config.latent_channels, 4, 4, device=self.device, dtype=self.vae_dtype)
        return bool(torch.isfinite(self.vae.decode(z).sample).all())


@dataclass
class _EditState:
    image_latents: torch.Tensor  # the input's sampled latents, scaled, one per image
    noise: torch.Tensor  # each image's initial noise
    blend_mask: torch.Tensor | None = None  # ordinary UNet inpainting: 1 where to repaint
    unet_extra: torch.Tensor | None = None  # inpainting UNet: mask and masked-image latents, per guidance half


def _edit_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule an edit runs (diffusers' img2img rule), telling the scheduler where it starts."""
    start = steps - edit_steps(steps, strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]
