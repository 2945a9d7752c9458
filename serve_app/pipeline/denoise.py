"""Stage 2: text embeddings + seeds -> denoised latents."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.sources import SourceFiles
from serve_app.pipeline.types import DenoiseJob, edit_steps


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
        vae_config = layout.component_config("vae")
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = vae_config.get("scaling_factor", 0.18215)
        self.latent_channels = vae_config.get("latent_channels", 4)
        self.inpaint_unet = layout.inpaint_unet
        self.steps_run = 0  # denoising steps done by this replica, for tests and metrics
        self.on_step: Callable[[float], None] | None = None  # called with each step's seconds

    def loaded_components(self) -> list[str]:
        return ["unet", "scheduler"]

    @torch.inference_mode()
    def probe(self) -> bool:
        """One UNet forward on an 8x8 latent with empty conditioning; True when finite."""
        config = self.unet.config
        latents = torch.zeros(1, config.in_channels, 8, 8, device=self.device, dtype=self.dtype)
        cond = torch.zeros(1, 4, config.cross_attention_dim, device=self.device, dtype=self.dtype)
        added = None
        if self.layout.is_sdxl:
            pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            added = {
                "text_embeds": torch.zeros(1, pooled_dim, device=self.device, dtype=self.dtype),
                "time_ids": torch.zeros(1, 6, device=self.device, dtype=self.dtype),
            }
        out = self.unet(latents, 500, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        return bool(torch.isfinite(out).all())

    def initial_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Per-image noise drawn on the CPU from each image's own generator, as
        diffusers does with a list of generators: an image depends only on its
        seed, not on the device or on which other images share its batch."""
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        return self.denoise_many([job])[0]

    def denoise_many(self, jobs: list[DenoiseJob]) -> list[np.ndarray]:
        """Denoise several jobs, running those that share size, steps and
        guidance as one batch. Each image still depends only on its own seed
        (up to floating-point differences between batch sizes)."""
        for out in self.denoise_many_steps(jobs):
            pass
        return out  # type: ignore[return-value]

    def denoise_many_steps(self, jobs: list[DenoiseJob]) -> Iterator[list[np.ndarray] | None]:
        """:meth:`denoise_many`, yielding None after every denoising step and
        the results last, so that a caller can stop between steps."""
        results: list[np.ndarray | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key(), []).append(i)
        for indices in groups.values():
            for kind, latents in self._run([jobs[i] for i in indices], set(), every_step=True):
                if kind == "step":
                    yield None
            offset = 0
            for i in indices:
                n = len(jobs[i].seeds)
                results[i] = latents[offset : offset + n]
                offset += n
        yield results  # type: ignore[misc]

    def denoise_steps(self, job: DenoiseJob, preview_steps: list[int]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ("preview", predicted clean latents) after each step listed in
        ``preview_steps`` (1-based), then ("final", latents)."""
        yield from self._run([job], set(preview_steps))

    def _run(
        self, jobs: list[DenoiseJob], preview_steps: set[int], every_step: bool = False
    ) -> Iterator[tuple[str, np.ndarray | None]]:
        """The denoising loop over jobs of one batch key, as one batch.
        Yields previews, ("step", None) after each step if ``every_step``, and ("final", latents)."""
        # inference_mode is per thread and a generator may be resumed on
        # another thread, so it is entered per step, never across a yield.
        first = jobs[0]
        guided = first.guidance > 1.0
        with torch.inference_mode():
            cond, added, scheduler, timesteps, latents, edit = self._prepare(jobs, guided)

        # 4. Denoising loop with classifier-free guidance.
        for i, step_t in enumerate(timesteps, start=1):
            with torch.inference_mode():
                started = time.perf_counter()
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
                self.steps_run += 1
                preview = None
                if i in preview_steps and i < len(timesteps):
                    # 5. A preview is the scheduler's estimate of the clean
                    # image at this step (the noisy latents where it gives none).
                    x0 = getattr(out, "pred_original_sample", None)
                    preview = (x0 if x0 is not None else latents).float().cpu().numpy()
                if self.on_step is not None:
                    self.on_step(time.perf_counter() - started)
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
        added: dict[str, torch.Tensor] | None = None
        if guided:
            cond = torch.cat([per_image("negative_prompt_embeds"), cond])
        if self.layout.is_sdxl:
            pooled = per_image("pooled_prompt_embeds")
            if guided:
                pooled = torch.cat([per_image("negative_pooled_prompt_embeds"), pooled])
            # original size, crop top-left, target size
            time_ids = torch.tensor([[first.height, first.width, 0, 0, first.height, first.width]], dtype=self.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device).repeat(pooled.shape[0], 1)}

        # 2. A scheduler of its own per call: schedulers keep per-run state.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(first.steps, device=self.device)

        # 3. Initial latents: noise from each image's seed, or for an edit the
        # input's latents noised to where the shortened schedule starts.
        if first.edit is None:
            if self.inpaint_unet:
                raise ValueError("this pipeline's UNet is an inpainting UNet: it edits images and cannot generate from text alone")
            seeds = [s for j in jobs for s in j.seeds]
            latents = self.initial_noise(seeds, first.height, first.width) * scheduler.init_noise_sigma
            return cond, added, scheduler, scheduler.timesteps, latents, None
        timesteps = edit_timesteps(scheduler, first.steps, first.strength)
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
        skip_image_sample = self.inpaint_unet and first.strength >= 1.0
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
                if self.inpaint_unet:
                    m_mean, m_std = torch.from_numpy(e.masked_mean), torch.from_numpy(e.masked_std)
                    masked.append(self.vae_scaling_factor * (m_mean + m_std * torch.randn(shape, generator=g, dtype=torch.float32)))
                if e.mask is not None:
                    masks.append(torch.from_numpy(e.mask))

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts).to(self.device, self.dtype)

        state = _EditState(image_latents=stack(image_latents), noise=stack(noise))
        if masks:
            mask = stack(masks)
            if self.inpaint_unet:
                extra = torch.cat([mask, stack(masked)], dim=1)
                state.unet_extra = torch.cat([extra] * 2) if guided else extra
            else:
                state.blend_mask = mask
        return state


@dataclass
class _EditState:
    image_latents: torch.Tensor  # the input's sampled latents, scaled, one per image
    noise: torch.Tensor  # each image's initial noise
    blend_mask: torch.Tensor | None = None  # ordinary UNet inpainting: 1 where to repaint
    unet_extra: torch.Tensor | None = None  # inpainting UNet: mask and masked-image latents, per guidance half


def edit_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule an edit runs: ``strength`` of ``steps``
    (diffusers' img2img rule), telling the scheduler where it starts."""
    start = steps - edit_steps(steps, strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]
