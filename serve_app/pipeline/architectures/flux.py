"""FLUX.1 [dev] and [schnell] (diffusers' ``FluxPipeline``) on our three stages.

- Text: CLIP-L's pooled output (one vector) and T5's hidden states (the
  sequence the transformer attends to), both from diffusers'
  ``FluxPipeline.encode_prompt`` on a pipeline object that holds only the
  text components. Every prompt is padded to the same T5 window, so any two
  jobs of one size batch together.
- Denoiser: ``FluxTransformer2DModel`` on latents packed in 2x2 patches
  (diffusers' ``_pack_latents``), with per-token image ids and all-zero text
  ids; the flow-matching Euler scheduler, its sigmas shifted by ``mu`` from
  the image's token count (``calculate_shift``; schnell's scheduler has
  dynamic shifting off, so ``mu`` changes nothing there).
- VAE: FLUX's 16-channel VAE, whose latents are shifted as well as scaled.

Edit variants, assembled from the same parts (the loop reads what the VAE
stage put in ``EditLatents``; the variants differ in what that is):
- ``FluxPipeline`` / ``FluxImg2ImgPipeline`` / ``FluxInpaintPipeline``:
  image-to-image, the input's latents noised to where the shortened schedule
  starts; with a mask, the input put back outside it after every step
  (``FlowInpaint``), as the inpaint pipeline does with any FLUX.1 model.
- ``FluxFillPipeline`` (FLUX.1 Fill): an inpainting transformer that also
  reads the masked image's packed latents and the packed pixel mask as
  extra input channels (``FluxFillPipeline.prepare_mask_latents``). It
  only edits: a job without an input image is refused (``NeedsInputImage``).
- ``FluxKontextPipeline`` (FLUX.1 Kontext): the input image's packed
  latents as extra tokens after the generated ones, with their own image
  ids (first id 1); generation starts from noise and runs every step.

Guidance. FLUX.1 [dev] is guidance-distilled: the guidance value is an
input of the transformer (``guidance_embeds`` in its config), not a second
pass. ``DenoiseJob.guidance`` is that value for dev (diffusers'
``guidance_scale``, 3.5 typical). [schnell] has no guidance input and
ignores it. True classifier-free guidance (diffusers' ``true_cfg_scale``)
is separate: it runs when ``DenoiseJob.true_cfg_scale`` > 1 and the text
stage encoded a negative prompt, at twice the cost per step.

The denoising loop is ours rather than ``FluxPipeline.__call__`` because
the stage needs per-step control: previews of the clean-image estimate,
cancellation between steps, and several requests' images in one batch with
one generator per image. Everything inside a step is diffusers' own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from serve_app.pipeline.architectures.base import (
    FlowInpaint,
    FlowMatchingArchitecture,
    edit_start,
    kept_text,
    prompt_embeddings,
    repaint_mask,
    to_uint8,
    to_unit_range,
)
from serve_app.pipeline.types import DenoiseJob, EditLatents, EditsUnsupported, NeedsInputImage, PromptEmbeddings

# diffusers refuses a longer T5 window; FLUX was trained with 512 tokens.
_MAX_T5_TOKENS = 512



class FluxArchitecture(FlowMatchingArchitecture):
    text_files: ClassVar[tuple[str, ...]] = ("model_index.json", "tokenizer/*", "tokenizer_2/*", "text_encoder/*", "text_encoder_2/*")
    # The VAE's config gives the latent grid and the latent scaling (below).
    denoiser_files: ClassVar[tuple[str, ...]] = ("model_index.json", "transformer/*", "scheduler/*", "vae/config.json")
    vae_files: ClassVar[tuple[str, ...]] = ("model_index.json", "vae/*")
    required_components: ClassVar[tuple[str, ...]] = (
        "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
    )

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        load = self.layout.load
        # A FluxPipeline with only its text components: encode_prompt needs
        # nothing else, and the other stages' weights never load here.
        self.text_pipe = FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=load("text_encoder", dtype=self.dtype, device=self.device),
            tokenizer=load("tokenizer"),
            text_encoder_2=load("text_encoder_2", dtype=self.dtype, device=self.device),
            tokenizer_2=load("tokenizer_2"),
            transformer=None,
        )
        self.t5_window = min(_MAX_T5_TOKENS, self.text_pipe.tokenizer_2.model_max_length)

    def _embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _text_ids = self.text_pipe.encode_prompt(
            prompt=text, device=torch.device(self.device), num_images_per_prompt=1, max_sequence_length=self.t5_window
        )
        return embeds, pooled

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None) -> PromptEmbeddings:
        """T5 is the tokenizer that counts: its window (512 tokens in the
        real model) is what the transformer reads; CLIP's 77 only cut the
        pooled vector's text, as in diffusers."""
        # 1. Count T5 tokens and find what its window keeps (it ends with </s>).
        tokenizer = self.text_pipe.tokenizer_2
        window = self.t5_window - 1
        ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
        truncated = len(ids) > window
        counted = ids if count_prompt is None else tokenizer(count_prompt, truncation=False, add_special_tokens=False).input_ids

        # 2. The prompt; 3. the negative prompt only when there is one: FLUX
        # runs it only for true classifier-free guidance.
        embeds, pooled = self._embed(prompt)
        neg_embeds = neg_pooled = None
        if negative_prompt:
            neg_embeds, neg_pooled = self._embed(negative_prompt)

        return prompt_embeddings(
            embeds, neg_embeds, pooled, neg_pooled,
            token_count=len(counted), truncated=truncated, encoded_prompt=kept_text(tokenizer, prompt, window) if truncated else prompt,
        )

    def probe_text(self) -> bool:
        e = self.encode("")
        return bool(np.isfinite(e.prompt_embeds).all() and np.isfinite(e.pooled_prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def _read_latent_space(self) -> None:
        """The latent grid and scaling from the VAE's config, read without
        loading the VAE (the denoiser and VAE stages both have vae/config.json)."""
        vae = self.layout.component_config("vae")
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        self.latent_channels = vae.get("latent_channels", 16)
        self.scaling_factor = vae["scaling_factor"]
        self.shift_factor = vae.get("shift_factor") or 0.0

    def load_denoiser(self) -> None:
        self._read_latent_space()
        self.transformer = self.layout.load("transformer", dtype=self.dtype, device=self.device)
        self.scheduler = self.layout.load("scheduler")
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)

    def steps_for(self, job: DenoiseJob) -> int:
        if job.edit is None or job.edit.references:
            return job.steps  # generation, and edits by reference, start from noise
        return job.steps - edit_start(job.steps, job.strength)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """The unpacked latent grid. Packing takes 2x2 latent patches, so
        the image must divide by twice the VAE's factor (16 for FLUX)."""
        unit = 2 * self.vae_scale_factor
        if height % unit or width % unit:
            raise ValueError(f"FLUX needs an image size that divides by {unit}; got {width}x{height}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        n, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, n, c, h, w)

    @torch.inference_mode()
    def probe_denoiser(self) -> bool:
        """One transformer forward on a 2x2-token image with empty text; True when finite."""
        config = self.transformer.config
        z = self.transformer(
            hidden_states=torch.zeros(1, 4, config.in_channels, device=self.device, dtype=self.dtype),
            timestep=torch.full([1], 0.5, device=self.device, dtype=self.dtype),
            guidance=torch.ones(1, device=self.device) if self.guidance_embeds else None,
            pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=self.device, dtype=self.dtype),
            encoder_hidden_states=torch.zeros(1, 4, config.joint_attention_dim, device=self.device, dtype=self.dtype),
            txt_ids=torch.zeros(4, 3, device=self.device, dtype=self.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, 2, 2, self.device, self.dtype),
            return_dict=False,
        )[0]
        return bool(torch.isfinite(z).all())

    def _velocity(self, run: "FluxRun", latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        timestep = (t.expand(n).to(latents.dtype) / 1000).repeat(run.halves)
        # FLUX.2's transformer has no pooled text input.
        pooled = {} if run.pooled is None else {"pooled_projections": run.pooled}
        v = self.transformer(
            hidden_states=run.model_input(latents),
            timestep=timestep,
            guidance=run.guidance,
            encoder_hidden_states=run.embeds,
            txt_ids=run.text_ids,
            img_ids=run.image_ids,
            return_dict=False,
            **pooled,
        )[0]
        v = v[:, : latents.shape[1]]  # the reference tokens' outputs are not stepped
        if run.halves == 2:
            cond, uncond = v.chunk(2)
            v = uncond + run.cfg_scale * (cond - uncond)
        return v

    def _latents_out(self, latents: torch.Tensor, jobs: list[DenoiseJob]) -> np.ndarray:
        return self._unpack(latents, jobs[0])

    def _unpack(self, latents: torch.Tensor, job: DenoiseJob) -> np.ndarray:
        """Packed tokens -> (n, 16, h, w) float32, the VAE stage's input."""
        z = FluxPipeline._unpack_latents(latents, job.height, job.width, self.vae_scale_factor)
        return z.float().cpu().numpy()

    def _prepare(self, jobs: list[DenoiseJob]) -> "FluxRun":
        first = jobs[0]
        h, w = self._grid(first.height, first.width)
        shape = (1, self.latent_channels, h, w)
        seeds = [s for j in jobs for s in j.seeds]
        n = len(seeds)

        def per_image(field: str) -> torch.Tensor:
            # Each job's (1, ...) embedding repeated once per image, jobs in order.
            parts = [torch.from_numpy(getattr(j.embeddings, field)).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
            return torch.cat(parts).to(self.device, self.dtype)

        # 1. Conditioning; with true CFG the negative half follows as one batch.
        true_cfg = first.true_cfg_scale > 1 and first.embeddings.negative_prompt_embeds is not None
        embeds, pooled = per_image("prompt_embeds"), per_image("pooled_prompt_embeds")
        if true_cfg:
            embeds = torch.cat([embeds, per_image("negative_prompt_embeds")])
            pooled = torch.cat([pooled, per_image("negative_pooled_prompt_embeds")])
        halves = 2 if true_cfg else 1
        guidance = None
        if self.guidance_embeds:
            # float32 whatever the model's dtype, as diffusers passes it.
            guidance = torch.full([n * halves], first.guidance, device=self.device, dtype=torch.float32)

        # 2. A scheduler of its own per call (schedulers keep per-run state),
        # its sigmas shifted by mu from the generated image's token count
        # (reference tokens do not count), as FluxPipeline does.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / first.steps, first.steps)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, first.steps, self.device, sigmas=sigmas, mu=mu)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.dtype)

        # 3. Initial latents, drawn unpacked on the CPU from each image's own
        # generator (diffusers' order with a list of generators), then packed;
        # and what an edit adds to the transformer's input.
        channel_extra = reference_tokens = inpaint = None
        if first.edit is None or first.edit.references:
            scheduler.set_begin_index(0)
            noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
            latents = torch.cat(noise)
            if first.edit is not None:
                reference_tokens, reference_ids = self._references(jobs)
                image_ids = torch.cat([image_ids, reference_ids])  # dim 0 is the sequence
        else:
            start = edit_start(first.steps, first.strength)
            scheduler.set_begin_index(start * scheduler.order)
            timesteps = timesteps[start * scheduler.order :]
            image, noise, masked = self._edit_draws(jobs, shape)
            # FluxImg2ImgPipeline, FluxInpaintPipeline and FluxFillPipeline noise the
            # input to where the shortened schedule starts; with no steps left the input is the result.
            latents = image if len(timesteps) == 0 else scheduler.scale_noise(image, timesteps[:1].repeat(n), noise)
            if masked is not None:
                channel_extra = self._fill_conditioning(jobs, masked)
            elif first.edit.mask is not None:
                # Masks at the latent grid, on all 16 channels, packed like the latents (FluxInpaintPipeline).
                masks = [torch.from_numpy(j.edit.mask).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
                mask = torch.cat(masks).repeat(1, self.latent_channels, 1, 1)
                inpaint = FlowInpaint(*(self._pack(x.to(self.device, self.dtype)) for x in (image, noise, mask)))
        latents = self._pack(latents.to(self.device, self.dtype))

        return FluxRun(
            scheduler=scheduler,
            timesteps=timesteps,
            latents=latents,
            embeds=embeds,
            pooled=pooled,
            guidance=guidance,
            text_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            image_ids=image_ids,
            halves=halves,
            cfg_scale=first.true_cfg_scale,
            channel_extra=channel_extra,
            reference_tokens=reference_tokens,
            inpaint=inpaint,
        )

    def _normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's own latent space -> the transformer's (FLUX shifts, then scales)."""
        return (latents - self.shift_factor) * self.scaling_factor

    def _edit_draws(self, jobs: list[DenoiseJob], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each image's sample of the input's latent distribution, its noise
        and (Fill) its sample of the masked image's, from its own seeded
        generator: the draws FluxImg2ImgPipeline / FluxFillPipeline make for
        one image, in their order, so an image depends only on its seed and
        input. (With several generators diffusers samples the inputs once,
        from the first; here every image samples its own.)"""
        images, noises, masked = [], [], []
        for job in jobs:
            e = job.edit
            assert e is not None
            for seed in job.seeds:
                g = torch.Generator("cpu").manual_seed(seed)
                sample = torch.from_numpy(e.mean) + torch.from_numpy(e.std) * torch.randn(shape, generator=g, dtype=torch.float32)
                images.append(self._normalise(sample))
                noises.append(torch.randn(shape, generator=g, dtype=torch.float32))
                if e.masked_mean is not None:
                    draw = torch.randn(shape, generator=g, dtype=torch.float32)
                    masked.append(self._normalise(torch.from_numpy(e.masked_mean) + torch.from_numpy(e.masked_std) * draw))
        return torch.cat(images), torch.cat(noises), (torch.cat(masked) if masked else None)

    def _fill_conditioning(self, jobs: list[DenoiseJob], masked: torch.Tensor) -> torch.Tensor:
        """FLUX.1 Fill's extra input channels per token: the masked image's
        packed latents, then the packed pixel mask, as
        ``FluxFillPipeline.prepare_mask_latents`` builds them."""
        masks = [torch.from_numpy(j.edit.mask).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
        mask = self._pack(torch.cat(masks).to(self.device, self.dtype))
        return torch.cat([self._pack(masked.to(self.device, self.dtype)), mask], dim=-1)

    def _references(self, jobs: list[DenoiseJob]) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.1 Kontext's reference tokens (each image's own job's input,
        packed) and their ids: the latent grid's, with the first id 1 where the
        generated image's is 0, as ``FluxKontextPipeline.prepare_latents``
        makes them. Kontext takes one reference image."""
        if any(len(j.edit.references) != 1 for j in jobs):
            raise ValueError("FLUX.1 Kontext takes one reference image")
        per_image = [torch.from_numpy(j.edit.references[0]).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
        references = torch.cat(per_image).to(self.device, self.dtype)
        n, _, h, w = references.shape
        ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.dtype)
        ids[..., 0] = 1
        return self._pack(references), ids

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        self._read_latent_space()
        self._load_vae_module()

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unpacked (n, 16, h, w) latents -> pixels, undoing FLUX's scale and shift as FluxPipeline does."""
        z = torch.from_numpy(latents).to(self.device, self.vae_dtype)
        return to_uint8(self.vae.decode(z / self.scaling_factor + self.shift_factor).sample)

    def _distribution(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """An image's latent distribution in the VAE's own (unshifted, unscaled) space."""
        dist = self.vae.encode(image.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        """The input's latent distribution, which the denoiser samples from
        each image's seed; with a mask, the repaint mask at the latent grid."""
        height, width = pixels.shape[:2]
        h, w = self._grid(height, width)  # packing needs sizes that divide by 16
        mean, std = self._distribution(to_unit_range(pixels))
        latents = EditLatents(mean=mean, std=std)
        if alpha is not None:
            # Nearest-neighbour, as FluxInpaintPipeline.prepare_mask_latents resizes its binarised mask.
            latents.mask = F.interpolate(torch.from_numpy(repaint_mask(alpha))[None, None], size=(h, w)).numpy()
        return latents

    @torch.inference_mode()
    def probe_vae(self) -> bool:
        """Decode the smallest latent; True when the pixels are finite."""
        z = torch.zeros(1, self.latent_channels, 2, 2, device=self.device, dtype=self.vae_dtype)
        return bool(torch.isfinite(self.vae.decode(z).sample).all())


class FluxFillArchitecture(FluxArchitecture):
    """FLUX.1 Fill: inpainting, the mask and the masked image as extra input channels."""


    def check_job(self, job: DenoiseJob) -> None:
        if job.edit is None:
            raise NeedsInputImage("FLUX.1 Fill inpaints an input image; it cannot generate from text alone")

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        """The input's distribution, the masked input's, and the mask at
        latent size with each cell's 8x8 pixels as channels (the layout
        ``FluxFillPipeline.prepare_mask_latents`` makes before packing).
        Without a mask the whole image is repainted: Fill always takes one."""
        height, width = pixels.shape[:2]
        self._grid(height, width)
        if alpha is None:
            alpha = np.zeros((height, width), np.uint8)
        image = to_unit_range(pixels)
        repaint = torch.from_numpy(repaint_mask(alpha))[None, None]
        mean, std = self._distribution(image)
        masked_mean, masked_std = self._distribution(image * (1 - repaint))
        mask = F.pixel_unshuffle(repaint, self.vae_scale_factor)
        return EditLatents(mean=mean, std=std, mask=mask.numpy(), masked_mean=masked_mean, masked_std=masked_std)


class FluxKontextArchitecture(FluxArchitecture):
    """FLUX.1 Kontext: the input image as extra tokens; without one it generates from text."""


    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        """The input's latents as Kontext reads them: the distribution's mode
        (``sample_mode="argmax"``, no draw), shifted and scaled. The input
        comes at the output size, where FluxKontextPipeline would resize it
        to one of its preferred resolutions."""
        if alpha is not None:
            raise EditsUnsupported("FLUX.1 Kontext edits the whole image as its prompt says; it takes no mask")
        height, width = pixels.shape[:2]
        self._grid(height, width)
        mean, _ = self._distribution(to_unit_range(pixels))
        return EditLatents(references=[self._normalise(torch.from_numpy(mean)).numpy()])


@dataclass
class FluxRun:
    """One batch's denoising state, shared by the FLUX.1 variants and FLUX.2 (their step loop is one)."""

    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor  # packed: (images, tokens, 64)
    embeds: torch.Tensor  # T5 sequence, prompts then (true CFG) negative prompts
    pooled: torch.Tensor | None  # CLIP pooled, same order (FLUX.1)
    guidance: torch.Tensor | None  # dev's distilled guidance, one per row
    text_ids: torch.Tensor
    image_ids: torch.Tensor  # the generated tokens', then the reference tokens'
    halves: int  # 2 with true CFG: each row runs with the prompt and the negative prompt
    cfg_scale: float  # how the two halves mix: uncond + cfg_scale * (cond - uncond)
    # FLUX.1 Fill: (images, tokens, 320) concatenated to each token's channels.
    channel_extra: torch.Tensor | None = None
    # FLUX.1 Kontext, FLUX.2: (images, reference tokens, channels) after the generated tokens.
    reference_tokens: torch.Tensor | None = None
    # FLUX.1 inpainting with an ordinary transformer, packed like the latents.
    inpaint: FlowInpaint | None = None

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's hidden states for this step, per guidance half."""
        if self.channel_extra is not None:
            latents = torch.cat([latents, self.channel_extra], dim=2)
        if self.reference_tokens is not None:
            latents = torch.cat([latents, self.reference_tokens], dim=1)
        return latents.repeat(self.halves, 1, 1)
