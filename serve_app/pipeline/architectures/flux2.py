"""FLUX.2 [klein] (diffusers' ``Flux2KleinPipeline``) on our three stages.

- Text: a Qwen3 causal LM reads the prompt inside Qwen3's chat template
  (thinking off), padded to a fixed window (512 in the real model); the
  conditioning is its hidden states after layers 9, 18 and 27 side by side
  (``Flux2KleinPipeline.encode_prompt``, on a pipeline object that holds
  only the tokenizer and the text encoder). Every prompt has the same
  length, so any two jobs of one size batch together.
- Denoiser: ``Flux2Transformer2DModel`` on patchified latents (FLUX.2's VAE
  latents in 2x2 patches, 128 channels, one token per patch) with 4-D
  position ids (time, row, column, layer; diffusers' ``_prepare_latent_ids``
  and ``_prepare_text_ids``); the flow-matching Euler scheduler shifted by
  ``compute_empirical_mu`` from the token count and the step count.
  Classifier-free guidance against the empty prompt, unless the checkpoint
  is distilled (``is_distilled`` in model_index.json, [klein] 4B/9B): then
  the text stage encodes no negative and guidance is ignored.
- VAE: ``AutoencoderKLFlux2``, whose latents the transformer sees
  patchified and normalised by the VAE's own batch-norm running
  statistics; the VAE stage undoes both before decoding.
- Edits: reference images. Each input image's latents (the encoder's mode,
  patchified and normalised: ``Flux2KleinPipeline._encode_vae_image``)
  join the sequence as extra tokens with their own time ids (10, 20, ...);
  generation starts from noise. Every image a request sends is a
  reference, each prepared as the pipeline prepares it (at most a
  megapixel, sides a multiple of 16).

The step loop is :class:`FluxArchitecture`'s (previews, cancellation,
cross-request batches, one generator per image); only what differs is here.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

from serve_app.pipeline.architectures.base import kept_text, prompt_embeddings, to_uint8
from serve_app.pipeline.architectures.flux import FluxArchitecture, FluxRun
from serve_app.pipeline.types import DenoiseJob, EditInputs, EditLatents, EditsUnsupported, PromptEmbeddings

# Flux2KleinPipeline's text window (its tokenizer_max_length).
_MAX_TEXT_TOKENS = 512
# Stands for the user's text when finding where it starts in the chat template.
_CONTENT_MARK = "\u2063"


# Flux2KleinPipeline's cap on a reference image's pixels.
_REFERENCE_AREA = 1024 * 1024


class Flux2KleinArchitecture(FluxArchitecture):
    text_files: ClassVar[tuple[str, ...]] = ("model_index.json", "tokenizer/*", "text_encoder/*")
    denoiser_files: ClassVar[tuple[str, ...]] = ("model_index.json", "transformer/*", "scheduler/*", "vae/config.json")
    vae_files: ClassVar[tuple[str, ...]] = ("model_index.json", "vae/*")
    required_components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    # Every image sent is a reference, each at its own size. The pipeline sets
    # no limit; each reference adds up to 4,096 tokens to every step's
    # attention, so we take at most four (our choice, not the model's rule).
    edit_inputs: ClassVar[EditInputs] = EditInputs(max_images=4, references=True)

    def _pipeline(self, **components) -> Flux2KleinPipeline:
        """A Flux2KleinPipeline holding only one stage's components, for diffusers' own methods."""
        parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
        return Flux2KleinPipeline(**{**parts, **components}, is_distilled=self.layout.is_distilled)

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        self.text_pipe = self._pipeline(
            text_encoder=self.layout.load("text_encoder", dtype=self.dtype, device=self.device),
            tokenizer=self.layout.load("tokenizer"),
        )
        tokenizer = self.text_pipe.tokenizer
        self.text_window = min(_MAX_TEXT_TOKENS, tokenizer.model_max_length)
        # The window is cut at its end, so what it keeps of a prompt is what
        # follows the template's opening (up to the user's text).
        opening = self._chat(_CONTENT_MARK).split(_CONTENT_MARK)[0]
        self.prompt_window = self.text_window - len(tokenizer(opening, add_special_tokens=False).input_ids)

    def _chat(self, text: str) -> str:
        return self.text_pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def _embed(self, text: str) -> torch.Tensor:
        embeds, _text_ids = self.text_pipe.encode_prompt(
            prompt=text, device=torch.device(self.device), max_sequence_length=self.text_window
        )
        return embeds

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None) -> PromptEmbeddings:
        # 1. Count the prompt's tokens and find what the window keeps of it.
        tokenizer = self.text_pipe.tokenizer
        window = self.prompt_window
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        truncated = len(ids) > window
        counted = ids if count_prompt is None else tokenizer(count_prompt, add_special_tokens=False).input_ids

        # 2. The prompt; 3. the negative (Flux2KleinPipeline's is the empty
        # prompt) only where the model runs classifier-free guidance.
        embeds = self._embed(prompt)
        negative = None if self.layout.is_distilled else self._embed(negative_prompt)
        return prompt_embeddings(
            embeds, negative, None, None,
            token_count=len(counted), truncated=truncated, encoded_prompt=kept_text(tokenizer, prompt, window) if truncated else prompt,
        )

    def probe_text(self) -> bool:
        return bool(np.isfinite(self.encode("").prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def _read_latent_space(self) -> None:
        vae = self.layout.component_config("vae")
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        patch = vae.get("patch_size", (2, 2))
        # The transformer's channels: the VAE's latents in 2x2 patches.
        self.latent_channels = vae.get("latent_channels", 32) * patch[0] * patch[1]

    def load_denoiser(self) -> None:
        self._read_latent_space()
        self.transformer = self.layout.load("transformer", dtype=self.dtype, device=self.device)
        self.scheduler = self.layout.load("scheduler")
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)

    def _patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patches per column and row: the image divides by twice the VAE's factor."""
        h, w = self._grid(height, width)
        return h // 2, w // 2

    @torch.inference_mode()
    def probe_denoiser(self) -> bool:
        """One transformer forward on a 2x2-token image with empty text; True when finite."""
        config = self.transformer.config
        image = torch.zeros(1, config.in_channels, 2, 2, device=self.device, dtype=self.dtype)
        text = torch.zeros(1, 4, config.joint_attention_dim, device=self.device, dtype=self.dtype)
        z = self.transformer(
            hidden_states=Flux2KleinPipeline._pack_latents(image),
            timestep=torch.full([1], 0.5, device=self.device, dtype=self.dtype),
            guidance=torch.ones(1, device=self.device) if self.guidance_embeds else None,
            encoder_hidden_states=text,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(self.device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(image).to(self.device),
            return_dict=False,
        )[0]
        return bool(torch.isfinite(z).all())

    def _prepare(self, jobs: list[DenoiseJob]) -> FluxRun:
        first = jobs[0]
        h, w = self._patch_grid(first.height, first.width)
        shape = (1, self.latent_channels, h, w)
        seeds = [s for j in jobs for s in j.seeds]
        n = len(seeds)

        def per_image(field: str) -> torch.Tensor:
            parts = [torch.from_numpy(getattr(j.embeddings, field)).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
            return torch.cat(parts).to(self.device, self.dtype)

        # 1. Conditioning: the prompts, then (guidance) the empty prompt, as one batch.
        guided = first.guidance > 1 and not self.layout.is_distilled and first.embeddings.negative_prompt_embeds is not None
        embeds = per_image("prompt_embeds")
        if guided:
            embeds = torch.cat([embeds, per_image("negative_prompt_embeds")])
        guidance = torch.full([n * (2 if guided else 1)], first.guidance, device=self.device, dtype=torch.float32) if self.guidance_embeds else None

        # 2. A scheduler of its own, shifted as Flux2KleinPipeline shifts it:
        # by an empirical mu from the token count and the number of steps.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / first.steps, first.steps)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=first.steps)
        timesteps, _ = retrieve_timesteps(scheduler, first.steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)

        # 3. Noise drawn at the patchified shape from each image's own
        # generator (Flux2KleinPipeline draws it so), then packed; the
        # references' tokens and ids after the generated image's.
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
        latents = torch.cat(noise).to(self.device, self.dtype)
        image_ids = Flux2KleinPipeline._prepare_latent_ids(latents[:1])[0]
        reference_tokens = None
        if first.edit is not None:
            reference_tokens, reference_ids = self._references(jobs)
            image_ids = torch.cat([image_ids, reference_ids])
        return FluxRun(
            scheduler=scheduler,
            timesteps=timesteps,
            latents=Flux2KleinPipeline._pack_latents(latents),
            embeds=embeds,
            pooled=None,
            guidance=guidance,
            text_ids=Flux2KleinPipeline._prepare_text_ids(embeds[:1])[0].to(self.device),
            image_ids=image_ids.to(self.device),
            halves=2 if guided else 1,
            cfg_scale=first.guidance,
            reference_tokens=reference_tokens,
        )

    def _references(self, jobs: list[DenoiseJob]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's job's reference latents, packed and concatenated, and
        their ids (``Flux2KleinPipeline.prepare_image_latents``' layout)."""
        first = [torch.from_numpy(r) for r in jobs[0].edit.references]
        ids = Flux2KleinPipeline._prepare_image_ids(first)[0]
        rows = []
        for job in jobs:
            tokens = torch.cat([Flux2KleinPipeline._pack_latents(torch.from_numpy(r)) for r in job.edit.references], dim=1)
            rows.append(tokens.repeat_interleave(len(job.seeds), dim=0))
        return torch.cat(rows).to(self.device, self.dtype), ids

    def _unpack(self, latents: torch.Tensor, job: DenoiseJob) -> np.ndarray:
        """Tokens -> (n, 128, h, w) patchified, normalised latents: the VAE stage's input."""
        h, w = self._patch_grid(job.height, job.width)
        return latents.reshape(latents.shape[0], h, w, -1).permute(0, 3, 1, 2).float().cpu().numpy()

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        self._read_latent_space()
        self._load_vae_module()
        self.vae_pipe = self._pipeline(vae=self.vae)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Undo the batch-norm normalisation and the 2x2 patches, then decode, as Flux2KleinPipeline does."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.dtype)
        return self.vae.decode(Flux2KleinPipeline._unpatchify_latents(z * std + mean)).sample

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return to_uint8(self._decode(torch.from_numpy(latents).to(self.device, self.vae_dtype)))

    @torch.inference_mode()
    def encode_image(
        self, pixels: np.ndarray, alpha: np.ndarray | None = None, references: list[np.ndarray] | None = None
    ) -> EditLatents:
        """Each input image, as sent (or ``pixels`` alone), as a reference:
        cut to at most a megapixel with sides a multiple of 16, then its
        latents as Flux2KleinPipeline encodes a reference image (the mode, no draw)."""
        if alpha is not None:
            raise EditsUnsupported("FLUX.2 [klein] edits by reference image; it takes no mask")
        processor = self.vae_pipe.image_processor
        multiple = self.vae_pipe.vae_scale_factor * 2
        latents = []
        for image_pixels in references if references is not None else [pixels]:
            image = Image.fromarray(image_pixels)
            try:
                processor.check_image_input(image)  # the pipeline's own limits: sides >= 64 px, aspect ratio
            except ValueError as e:
                raise EditsUnsupported(f"FLUX.2 [klein] cannot use this reference image: {e}") from None
            if image.width * image.height > _REFERENCE_AREA:
                image = processor._resize_to_target_area(image, _REFERENCE_AREA)
            width, height = image.width // multiple * multiple, image.height // multiple * multiple
            tensor = processor.preprocess(image, height=height, width=width, resize_mode="crop")
            reference = self.vae_pipe._encode_vae_image(tensor.to(self.device, self.vae_dtype), generator=None)
            latents.append(reference.float().cpu().numpy())
        return EditLatents(references=latents)

    @torch.inference_mode()
    def probe_vae(self) -> bool:
        z = torch.zeros(1, self.latent_channels, 2, 2, device=self.device, dtype=self.vae_dtype)
        return bool(torch.isfinite(self._decode(z)).all())
