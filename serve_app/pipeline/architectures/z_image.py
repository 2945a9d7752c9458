"""Z-Image (diffusers' ``ZImagePipeline``, e.g. Z-Image-Turbo) and its
img2img and inpaint pipelines on our three stages.

- Text: the second-to-last hidden states of a Qwen3 language model over the
  prompt wrapped in the tokenizer's chat template, with the padding dropped,
  from diffusers' ``ZImagePipeline.encode_prompt`` on a pipeline object that
  holds only the tokenizer and the text encoder. The embeddings are ragged:
  each ``PromptEmbeddings`` holds one prompt's tokens, as many as it has.
- Denoiser: ``ZImageTransformer2DModel``, a single-stream DiT that takes a
  *list* of latents (one (C, 1, h, w) tensor per image) and a list of caption
  features of any lengths; it pads each caption to a multiple of 32 and the
  batch to its longest sequence with an attention mask itself. So jobs whose
  prompts differ in length batch together by passing the list: no padding
  of ours. The flow-matching Euler scheduler with diffusers' Z-Image sigmas
  (``mu`` from the image's token count; Turbo's scheduler shifts statically).
- VAE: FLUX's ``AutoencoderKL`` (16 channels), latents shifted and scaled.

Sign and time conventions. The transformer is given ``(1000 - t) / 1000``
(0 at pure noise, 1 at the clean image) and predicts the direction from
noise to image; ``ZImagePipeline`` negates it before the scheduler's step.
That negated output is the flow-matching velocity v = noise - x0, so the
clean-image estimate for previews is x0 = x_t - sigma_t * v, as for FLUX.

Guidance. ``DenoiseJob.guidance`` is diffusers' ``guidance_scale``: above 0
each step also runs the negative prompt and mixes pos + g * (pos - neg)
(Z-Image's form: g = 0 is no guidance, where other models use 1). Z-Image-
Turbo is distilled for guidance 0 and about 8 steps; the base model uses
guidance. diffusers' ``cfg_normalization`` and ``cfg_truncation`` stay at
their defaults (off). The text stage always encodes the negative prompt
(the empty one by default, cached), as Qwen-Image's does.

Edits (``ZImageImg2ImgPipeline``, ``ZImageInpaintPipeline``): the input's
latents noised to where the shortened schedule starts; inpainting puts the
input back outside the mask after every step, noised to the next step's
level. (The inpaint pipeline also encodes the masked image, but its loop
never reads those latents.)

The denoising loop is ours rather than the pipeline's ``__call__`` because
the stage needs per-step control: previews of the clean-image estimate,
cancellation between steps, and several requests' images in one batch with
one generator per image. Everything inside a step is diffusers' own code.
(Modular Diffusers' Z-Image denoise step, ``ZImageDenoiseLoopWrapper``, runs
the whole loop inside one block call, with no place to yield between steps.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas, retrieve_timesteps

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
from serve_app.pipeline.types import DenoiseJob, EditLatents, PromptEmbeddings

# diffusers' ZImagePipeline default: the tokens of the templated prompt the text encoder reads.
_MAX_TEXT_TOKENS = 512


class ZImageArchitecture(FlowMatchingArchitecture):
    text_files: ClassVar[tuple[str, ...]] = ("model_index.json", "tokenizer/*", "text_encoder/*")
    # The VAE's config gives the latent grid and the latents' scale and shift.
    denoiser_files: ClassVar[tuple[str, ...]] = ("model_index.json", "transformer/*", "scheduler/*", "vae/config.json")
    vae_files: ClassVar[tuple[str, ...]] = ("model_index.json", "vae/*")
    required_components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        # A pipeline object with only its text components: encode_prompt
        # needs nothing else, and the other stages' weights never load here.
        self.text_pipe = ZImagePipeline(
            scheduler=None,
            vae=None,
            text_encoder=self.layout.load("text_encoder", dtype=self.dtype, device=self.device),
            tokenizer=self.layout.load("tokenizer"),
            transformer=None,
        )
        self._negative_cache: dict[str, torch.Tensor] = {}
        # The window cuts the templated text at its end, so a prompt keeps
        # what the template's opening (the user turn's header) leaves of it.
        tokenizer = self.text_pipe.tokenizer
        marker = "\x00prompt\x00"
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        self.prompt_window = _MAX_TEXT_TOKENS - len(tokenizer(templated.split(marker)[0]).input_ids)

    def _embed(self, text: str) -> torch.Tensor:
        """(1, tokens, dim): one prompt's hidden states, padding dropped."""
        (embeds,), _ = self.text_pipe.encode_prompt(
            prompt=text, device=torch.device(self.device), do_classifier_free_guidance=False, max_sequence_length=_MAX_TEXT_TOKENS
        )
        return embeds[None]

    def _embed_negative(self, text: str) -> torch.Tensor:
        # The negative prompt is nearly always the same (empty) text: encode it once.
        if text not in self._negative_cache:
            if len(self._negative_cache) > 8:
                self._negative_cache.clear()
            self._negative_cache[text] = self._embed(text)
        return self._negative_cache[text]

    @torch.inference_mode()
    def encode(
        self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None, images: list[np.ndarray] | None = None
    ) -> PromptEmbeddings:
        # 1. Count the prompt's tokens in Qwen3's tokenizer and find what the window keeps.
        tokenizer = self.text_pipe.tokenizer
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        truncated = len(ids) > self.prompt_window
        counted = ids if count_prompt is None else tokenizer(count_prompt, add_special_tokens=False).input_ids

        # 2. The prompt; 3. the negative prompt, for guidance above 0.
        return prompt_embeddings(
            self._embed(prompt), self._embed_negative(negative_prompt), None, None,
            token_count=len(counted),
            truncated=truncated,
            encoded_prompt=kept_text(tokenizer, prompt, self.prompt_window) if truncated else prompt,
        )

    def probe_text(self) -> bool:
        e = self.encode("")
        return bool(np.isfinite(e.prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def _read_latent_space(self) -> None:
        """The latent grid and scaling from the VAE's config, read without loading the VAE."""
        vae = self.layout.component_config("vae")
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        self.latent_channels = vae.get("latent_channels", 16)
        self.scaling_factor = vae["scaling_factor"]
        self.shift_factor = vae.get("shift_factor") or 0.0

    def load_denoiser(self) -> None:
        self._read_latent_space()
        self.transformer = self.layout.load("transformer", dtype=self.dtype, device=self.device)
        self.scheduler = self.layout.load("scheduler")

    def steps_for(self, job: DenoiseJob) -> int:
        return job.steps if job.edit is None else job.steps - edit_start(job.steps, job.strength)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid; the transformer's 2x2 patches need sizes that divide by twice the VAE's factor."""
        unit = 2 * self.vae_scale_factor
        if height % unit or width % unit:
            raise ValueError(f"Z-Image needs an image size that divides by {unit}; got {width}x{height}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @torch.inference_mode()
    def probe_denoiser(self) -> bool:
        """One transformer forward on a 2x2-patch image with four caption tokens; True when finite."""
        config = self.transformer.config
        z = self.transformer(
            [torch.zeros(config.in_channels, 1, 4, 4, device=self.device, dtype=self.dtype)],
            torch.full([1], 0.5, device=self.device, dtype=self.dtype),
            [torch.zeros(4, config.cap_feat_dim, device=self.device, dtype=self.dtype)],
            return_dict=False,
        )[0][0]
        return bool(torch.isfinite(z).all())

    def _velocity(self, run: "_Run", latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        # 0 at pure noise, 1 at the clean image: Z-Image's time.
        timestep = (1000 - t.expand(n)) / 1000
        model_input = latents.to(self.dtype).repeat(run.halves, 1, 1, 1).unsqueeze(2)
        out = self.transformer(
            list(model_input.unbind(dim=0)),
            timestep.repeat(run.halves),
            run.captions,
            return_dict=False,
        )[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)
        if run.halves == 2:
            pos, neg = out[:n], out[n:]
            out = pos + run.guidance * (pos - neg)
        return -out  # ZImagePipeline's sign: the scheduler's velocity, noise - x0

    def _schedule(self, steps: int, image_tokens: int):
        """A scheduler of its own per call (schedulers keep per-run state),
        with ZImagePipeline's sigmas and its shift from the image's token count."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        config = scheduler.config
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=get_default_z_image_sigmas(steps), mu=mu)
        return scheduler, timesteps

    def _prepare(self, jobs: list[DenoiseJob]) -> "_Run":
        first = jobs[0]
        h, w = self._grid(first.height, first.width)
        shape = (1, self.latent_channels, h, w)
        seeds = [s for j in jobs for s in j.seeds]

        # 1. Conditioning: one caption per image, each as long as its prompt;
        # with guidance the negative prompts follow, as ZImagePipeline orders them.
        halves = 2 if first.guidance > 0 and first.embeddings.negative_prompt_embeds is not None else 1
        fields = ("prompt_embeds", "negative_prompt_embeds")[:halves]
        captions = [
            torch.from_numpy(getattr(j.embeddings, f)[0]).to(self.device, self.dtype) for f in fields for j in jobs for _ in j.seeds
        ]

        # 2. The schedule.
        scheduler, timesteps = self._schedule(first.steps, (h // 2) * (w // 2))
        run = _Run(scheduler=scheduler, timesteps=timesteps, latents=None, captions=captions, halves=halves, guidance=first.guidance)

        # 3. Initial latents, float32 as the pipeline keeps them, drawn on the
        # CPU from each image's own generator (diffusers' order with a list of generators).
        if first.edit is None:
            scheduler.set_begin_index(0)
            noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
            run.latents = torch.cat(noise).to(self.device)
            return run
        start = edit_start(first.steps, first.strength) * scheduler.order
        scheduler.set_begin_index(start)
        run.timesteps = timesteps[start:]
        images, noises, masks = self._edit_draws(jobs, shape)
        images, noises = images.to(self.device), noises.to(self.device)
        if masks:
            run.inpaint = FlowInpaint(images, noises, torch.cat(masks).to(self.device))
        # Noised to where the shortened schedule starts; with no steps left the input is the result.
        run.latents = images if len(run.timesteps) == 0 else scheduler.scale_noise(images, run.timesteps[:1].repeat(len(seeds)), noises)
        return run

    def _edit_draws(self, jobs: list[DenoiseJob], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Each image's sample of the input's latent distribution, then its
        noise, from its own seeded generator: the draws Z-Image's img2img and
        inpaint pipelines make for one image, so an image depends only on its
        seed and input. (With several generators diffusers samples the input
        once, from the first; here every image samples its own.)"""
        images, noises, masks = [], [], []
        for job in jobs:
            e = job.edit
            assert e is not None and e.mean is not None
            mean, std = torch.from_numpy(e.mean), torch.from_numpy(e.std)
            for seed in job.seeds:
                g = torch.Generator("cpu").manual_seed(seed)
                sample = mean + std * torch.randn(shape, generator=g, dtype=torch.float32)
                images.append((sample - self.shift_factor) * self.scaling_factor)
                noises.append(torch.randn(shape, generator=g, dtype=torch.float32))
                if e.mask is not None:
                    masks.append(torch.from_numpy(e.mask))
        return torch.cat(images), torch.cat(noises), masks

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        self._read_latent_space()
        self._load_vae_module()

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(n, 16, h, w) latents -> pixels, undoing the scale and shift as ZImagePipeline does."""
        z = torch.from_numpy(latents).to(self.device, self.vae_dtype)
        return to_uint8(self.vae.decode(z / self.scaling_factor + self.shift_factor).sample)

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        """The input's latent distribution in the VAE's own (unshifted,
        unscaled) space, which the denoiser samples from each image's seed;
        with a mask, the repaint mask at latent size."""
        height, width = pixels.shape[:2]
        h, w = self._grid(height, width)
        dist = self.vae.encode(to_unit_range(pixels).to(self.device, self.vae_dtype)).latent_dist
        latents = EditLatents(mean=dist.mean.float().cpu().numpy(), std=dist.std.float().cpu().numpy())
        if alpha is not None:
            # Nearest-neighbour to the latent grid, as ZImageInpaintPipeline resizes its binarised mask.
            latents.mask = F.interpolate(torch.from_numpy(repaint_mask(alpha))[None, None], size=(h, w), mode="nearest").numpy()
        return latents

    @torch.inference_mode()
    def probe_vae(self) -> bool:
        """Decode the smallest latent; True when the pixels are finite."""
        z = torch.zeros(1, self.latent_channels, 2, 2, device=self.device, dtype=self.vae_dtype)
        return bool(torch.isfinite(self.vae.decode(z).sample).all())


@dataclass
class _Run:
    """One batch's denoising state."""

    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor | None  # (images, 16, h, w) float32
    captions: list[torch.Tensor]  # one (tokens, dim) per row: prompts, then (guidance) negative prompts
    halves: int  # 2 with guidance: each image runs with the prompt and the negative prompt
    guidance: float
    inpaint: FlowInpaint | None = None
