"""Qwen-Image (diffusers' ``QwenImagePipeline``) on our three stages.

- Text: the last hidden states of a Qwen2.5-VL language model over the
  prompt wrapped in the pipeline's chat template, with the template's
  system prefix dropped, from diffusers' ``QwenImagePipeline.encode_prompt``
  on a pipeline object that holds only the tokenizer and the text encoder.
  The embeddings are as long as the prompt (no padding to a window): each
  ``PromptEmbeddings`` holds one prompt's tokens, all valid.
- Denoiser: ``QwenImageTransformer2DModel`` (an MMDiT) on 16-channel
  latents packed in 2x2 patches (diffusers' ``_pack_latents``), with the
  flow-matching Euler scheduler shifted by ``mu`` from the image's token
  count (``calculate_shift``). Jobs whose prompts differ in length batch
  together: the text sequences are zero-padded to the longest and the
  transformer gets ``encoder_hidden_states_mask``, which keeps the padding
  out of attention (text RoPE positions count from the start, so padding at
  the end moves no valid token).
- VAE: ``AutoencoderKLQwenImage``, a 3-D (video) VAE used on one frame; its
  latents are normalised per channel with the config's ``latents_mean`` and
  ``latents_std``.

Guidance. Qwen-Image has no distilled guidance input; its guidance is true
classifier-free guidance with diffusers' norm rescaling (the combined
prediction is scaled back to the conditional one's norm per token).
``DenoiseJob.guidance`` is diffusers' ``true_cfg_scale`` (4.0 typical); at
1 or below no negative pass runs. The text stage always encodes the
negative prompt (the empty one by default, cached), as SD3's does.

The denoising loop is ours rather than ``QwenImagePipeline.__call__``
because the stage needs per-step control: previews of the clean-image
estimate, cancellation between steps, and several requests' images (with
prompts of different lengths) in one batch with one generator per image.
Everything inside a step is diffusers' own code. (Modular Diffusers' Qwen
blocks run the same loop as one block, with no place to yield between
steps.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from PIL import Image

from serve_app.pipeline.architectures.base import FlowMatchingArchitecture, kept_text, prompt_embeddings, to_uint8
from serve_app.pipeline.types import DenoiseJob, EditInputs, EditLatents, EditsUnsupported, PromptEmbeddings

# diffusers' QwenImagePipeline default: the text tokens the transformer sees per prompt.
_MAX_TEXT_TOKENS = 512


class QwenImageArchitecture(FlowMatchingArchitecture):
    text_files: ClassVar[tuple[str, ...]] = ("model_index.json", "tokenizer/*", "text_encoder/*")
    # The VAE's config gives the latent grid and the latents' per-channel statistics.
    denoiser_files: ClassVar[tuple[str, ...]] = ("model_index.json", "transformer/*", "scheduler/*", "vae/config.json")
    vae_files: ClassVar[tuple[str, ...]] = ("model_index.json", "vae/*")
    required_components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    # The diffusers pipeline class whose prompt encoding, packing and helpers the stages use.
    diffusers_pipeline: ClassVar[type] = QwenImagePipeline

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        # A pipeline object with only its text components: encode_prompt
        # needs nothing else, and the other stages' weights never load here.
        self.text_pipe = self._text_pipeline(
            text_encoder=self.layout.load("text_encoder", dtype=self.dtype, device=self.device),
            tokenizer=self.layout.load("tokenizer"),
        )
        self._negative_cache: dict[str, torch.Tensor] = {}
        # The template's system prefix is dropped from the embeddings by a
        # fixed token count (34, its length in Qwen's tokenizer); whatever of
        # it another tokenizer leaves takes room in the window.
        pipe = self.text_pipe
        prefix = pipe.prompt_template_encode.split("{}")[0]
        leftover = max(0, len(pipe.tokenizer(prefix).input_ids) - pipe.prompt_template_encode_start_idx)
        self.prompt_window = _MAX_TEXT_TOKENS - leftover

    def _text_pipeline(self, text_encoder, tokenizer):
        return self.diffusers_pipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)

    def _embed(self, text: str) -> torch.Tensor:
        """(1, tokens, dim): one prompt's hidden states, every token valid."""
        embeds, mask = self.text_pipe.encode_prompt(
            prompt=text, device=torch.device(self.device), num_images_per_prompt=1, max_sequence_length=_MAX_TEXT_TOKENS
        )
        assert mask is None or bool(mask.all())  # one prompt: nothing padded
        return embeds

    def _embed_negative(self, text: str) -> torch.Tensor:
        # The negative prompt is nearly always the same (empty) text: encode it once.
        if text not in self._negative_cache:
            if len(self._negative_cache) > 8:
                self._negative_cache.clear()
            self._negative_cache[text] = self._embed(text)
        return self._negative_cache[text]

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None) -> PromptEmbeddings:
        # 1. Count the prompt's tokens in Qwen's tokenizer and find what the window keeps.
        tokenizer = self.text_pipe.tokenizer
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        truncated = len(ids) > self.prompt_window
        counted = ids if count_prompt is None else tokenizer(count_prompt, add_special_tokens=False).input_ids

        # 2. The prompt; 3. the negative prompt, for true guidance.
        embeds = self._embed(prompt)
        negative = self._embed_negative(negative_prompt)
        return prompt_embeddings(
            embeds, negative, None, None,
            token_count=len(counted),
            truncated=truncated,
            encoded_prompt=kept_text(tokenizer, prompt, self.prompt_window) if truncated else prompt,
        )

    def probe_text(self) -> bool:
        e = self.encode("")
        return bool(np.isfinite(e.prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def _read_latent_space(self) -> None:
        """The latent grid and statistics from the VAE's config, read without loading the VAE."""
        vae = self.layout.component_config("vae")
        # As QwenImagePipeline computes it: one spatial halving per temporal-downsample entry.
        self.vae_scale_factor = 2 ** len(vae["temperal_downsample"])
        self.latent_channels = vae["z_dim"]
        self.latents_mean = torch.tensor(vae["latents_mean"]).view(1, self.latent_channels, 1, 1, 1)
        self.latents_std = torch.tensor(vae["latents_std"]).view(1, self.latent_channels, 1, 1, 1)

    def load_denoiser(self) -> None:
        self._read_latent_space()
        self.transformer = self.layout.load("transformer", dtype=self.dtype, device=self.device)
        self.scheduler = self.layout.load("scheduler")

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """The unpacked latent grid; 2x2 packing needs sizes that divide by twice the VAE's factor."""
        unit = 2 * self.vae_scale_factor
        if height % unit or width % unit:
            raise ValueError(f"Qwen-Image needs an image size that divides by {unit}; got {width}x{height}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @torch.inference_mode()
    def probe_denoiser(self) -> bool:
        """One transformer forward on a 2x2-token image with four text tokens; True when finite."""
        config = self.transformer.config
        z = self.transformer(
            hidden_states=torch.zeros(1, 4, config.in_channels, device=self.device, dtype=self.dtype),
            encoder_hidden_states=torch.zeros(1, 4, config.joint_attention_dim, device=self.device, dtype=self.dtype),
            timestep=torch.full([1], 0.5, device=self.device, dtype=self.dtype),
            img_shapes=[[(1, 2, 2)]],
            return_dict=False,
        )[0]
        return bool(torch.isfinite(z).all())

    def _velocity(self, run: "_Run", latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        v = self.transformer(
            hidden_states=self._model_input(latents, run).repeat(run.halves, 1, 1),
            timestep=(t.expand(n).to(latents.dtype) / 1000).repeat(run.halves),
            encoder_hidden_states=run.embeds,
            encoder_hidden_states_mask=run.mask,
            img_shapes=run.img_shapes,
            return_dict=False,
        )[0][:, : latents.shape[1]]  # the generated image's tokens (an edit's references follow)
        if run.halves == 2:
            # True CFG with QwenImagePipeline's rescaling to the conditional prediction's norm.
            cond, uncond = v.chunk(2)
            combined = uncond + run.true_cfg_scale * (cond - uncond)
            v = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return v

    def _latents_out(self, latents: torch.Tensor, jobs: list[DenoiseJob]) -> np.ndarray:
        return self._unpack(latents, jobs[0])

    def _model_input(self, latents: torch.Tensor, run: "_Run") -> torch.Tensor:
        """The transformer's image sequence: the latents being denoised (edits append their references)."""
        return latents

    def _unpack(self, latents: torch.Tensor, job: DenoiseJob) -> np.ndarray:
        """Packed tokens -> (n, 16, h, w) float32 (the VAE's one frame dropped), the VAE stage's input."""
        z = self.diffusers_pipeline._unpack_latents(latents, job.height, job.width, self.vae_scale_factor)
        return z[:, :, 0].float().cpu().numpy()

    def _text(self, jobs: list[DenoiseJob], halves: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every row's text sequence, zero-padded to the longest, and the mask
        of its valid tokens (None when none is padded: diffusers' fast path
        for one prompt). Prompts first, then (true CFG) negative prompts."""
        fields = ("prompt_embeds", "negative_prompt_embeds")[:halves]
        rows = [torch.from_numpy(getattr(j.embeddings, f)[0]) for f in fields for j in jobs for _ in j.seeds]
        longest = max(len(r) for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(longest - len(r), r.shape[1])]) for r in rows])
        mask = torch.stack([torch.arange(longest) < len(r) for r in rows]).long()
        return embeds.to(self.device, self.dtype), None if bool(mask.all()) else mask.to(self.device)

    def _schedule(self, steps: int, image_tokens: int):
        """A scheduler of its own per call (schedulers keep per-run state),
        its sigmas shifted by mu from the image's token count, as QwenImagePipeline does."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        config = scheduler.config
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    def _noise(self, seeds: list[int], h: int, w: int) -> torch.Tensor:
        """Each image's initial noise, drawn unpacked on the CPU from its own
        generator in QwenImagePipeline's shape (images, frames, channels, h, w), then packed."""
        shape = (1, 1, self.latent_channels, h, w)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds])
        return self.diffusers_pipeline._pack_latents(noise.to(self.device, self.dtype), len(seeds), self.latent_channels, h, w)

    def _prepare(self, jobs: list[DenoiseJob]) -> "_Run":
        first = jobs[0]
        if first.edit is not None:
            raise ValueError("Qwen-Image generates from text; its edit models are Qwen-Image-Edit and Edit-Plus")
        h, w = self._grid(first.height, first.width)
        seeds = [s for j in jobs for s in j.seeds]
        # 1. Conditioning; with true CFG the negative half follows as one batch.
        halves = 2 if first.guidance > 1 and first.embeddings.negative_prompt_embeds is not None else 1
        embeds, mask = self._text(jobs, halves)
        # 2. The schedule; 3. the initial latents.
        scheduler, timesteps = self._schedule(first.steps, (h // 2) * (w // 2))
        return _Run(
            scheduler=scheduler,
            timesteps=timesteps,
            latents=self._noise(seeds, h, w),
            embeds=embeds,
            mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * (len(seeds) * halves),
            halves=halves,
            true_cfg_scale=first.guidance,
        )

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        self._read_latent_space()
        self._load_vae_module()

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Normalised (n, 16, h, w) latents -> pixels, undoing the per-channel
        normalisation as QwenImagePipeline writes it, on the VAE's one frame."""
        z = torch.from_numpy(latents)[:, :, None].to(self.device, self.vae_dtype)
        mean = self.latents_mean.to(self.device, self.vae_dtype)
        inverse_std = 1.0 / self.latents_std.to(self.device, self.vae_dtype)
        return to_uint8(self.vae.decode(z / inverse_std + mean).sample[:, :, 0])

    @torch.inference_mode()
    def probe_vae(self) -> bool:
        """Decode the smallest latent; True when the pixels are finite."""
        z = torch.zeros(1, self.latent_channels, 1, 2, 2, device=self.device, dtype=self.vae_dtype)
        return bool(torch.isfinite(self.vae.decode(z).sample).all())


@dataclass
class _Run:
    """One batch's denoising state."""

    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor  # packed: (images, tokens, 64)
    embeds: torch.Tensor  # text sequences, prompts then (true CFG) negative prompts, zero-padded
    mask: torch.Tensor | None  # (rows, tokens) 1 for valid text tokens; None when none is padded
    img_shapes: list  # per row: the (frames, h, w) token grids of its image sequence
    halves: int  # 2 with true CFG: each row runs with the prompt and the negative prompt
    true_cfg_scale: float
    references: torch.Tensor | None = None  # edits: packed reference-image tokens, per row
    inpaint: None = None  # no masked inpainting: the Qwen-Image pipelines have none


# --- Qwen-Image-Edit and Edit-Plus ---------------------------------------------

# Both edit pipelines encode each input image at about this many pixels (its
# aspect kept, sides multiples of 32) in the VAE.
_VAE_IMAGE_AREA = 1024 * 1024


def qwen2_vl_processor(layout, tokenizer):
    """transformers' own ``Qwen2VLProcessor`` for images and text, without its
    video processor: that one needs torchvision, which is absent (or does not
    import against the installed torch) on CPU machines, and an image edit
    never uses it. The image processor is transformers' PIL one
    (``Qwen2VLImageProcessorPil``), read from the pipeline's processor/ folder;
    with torchvision diffusers would load the torchvision one, whose bicubic
    resize rounds a little differently."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageTextQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(layout.root), subfolder="processor")
    return ImageTextQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


class QwenImageEditArchitecture(QwenImageArchitecture):
    """Qwen-Image-Edit (``QwenImageEditPipeline``): the input image goes to
    the Qwen2.5-VL text encoder (at the VAE's size) and, through the VAE, to
    the denoiser as reference tokens appended to the image sequence; the edit
    starts from noise, so ``strength`` does not apply. Whole-image edits
    only: a mask is refused (Qwen-Image-Edit-Inpaint is a different pipeline)."""

    text_files: ClassVar[tuple[str, ...]] = ("model_index.json", "tokenizer/*", "text_encoder/*", "processor/*")
    required_components: ClassVar[tuple[str, ...]] = QwenImageArchitecture.required_components + ("processor",)
    edit_inputs: ClassVar[EditInputs] = EditInputs(max_images=1, text_sees_images=True, references=True)
    diffusers_pipeline: ClassVar[type] = QwenImageEditPipeline
    # Pixels of each image the text encoder sees; None: the VAE's size.
    condition_area: ClassVar[int | None] = None

    def _text_pipeline(self, text_encoder, tokenizer):
        return self.diffusers_pipeline(
            scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
            processor=qwen2_vl_processor(self.layout, tokenizer), transformer=None,
        )

    def load_text(self) -> None:
        super().load_text()
        # The edit pipelines do not cut the embeddings to a window.
        self.prompt_window = self.text_pipe.tokenizer_max_length

    @staticmethod
    def _size(area: int, image: Image.Image) -> tuple[int, int]:
        """(width, height) near ``area`` pixels with the image's aspect, as the edit pipelines compute it."""
        width, height = calculate_dimensions(area, image.width / image.height)[:2]
        return width, height

    def _condition_images(self, images: list[np.ndarray]) -> list[Image.Image]:
        """The images the text encoder sees, resized as the pipeline resizes them."""
        out = []
        for pixels in images:
            image = Image.fromarray(pixels)
            width, height = self._size(self.condition_area or _VAE_IMAGE_AREA, image)
            out.append(self.text_pipe.image_processor.resize(image, height, width))
        return out

    def _embed(self, text: str, images: list[Image.Image] | None = None) -> torch.Tensor:
        if not images:
            raise ValueError(f"{type(self).__name__} edits images; it cannot encode a prompt without one")
        # Edit takes one image, Edit-Plus a list.
        image = images if self.edit_inputs.max_images > 1 else images[0]
        embeds, _mask = self.text_pipe.encode_prompt(prompt=text, image=image, device=torch.device(self.device), num_images_per_prompt=1)
        return embeds

    @torch.inference_mode()
    def encode(
        self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None, images: list[np.ndarray] | None = None
    ) -> PromptEmbeddings:
        """As Qwen-Image's, with the input images in the prompt (the negative
        prompt too, as the pipeline encodes it): nothing is cached."""
        tokenizer = self.text_pipe.tokenizer
        counted = tokenizer(prompt if count_prompt is None else count_prompt, add_special_tokens=False).input_ids
        condition = self._condition_images(images or [])
        return prompt_embeddings(
            self._embed(prompt, condition), self._embed(negative_prompt, condition), None, None,
            token_count=len(counted), truncated=False, encoded_prompt=prompt,
        )

    def probe_text(self) -> bool:
        e = self.encode("", images=[np.full((64, 64, 3), 128, np.uint8)])
        return bool(np.isfinite(e.prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def _model_input(self, latents: torch.Tensor, run: "_Run") -> torch.Tensor:
        return torch.cat([latents, run.references], dim=1)

    def _prepare(self, jobs: list[DenoiseJob]) -> "_Run":
        first = jobs[0]
        if first.edit is None or first.edit.references is None:
            raise ValueError(f"{type(self).__name__} edits images; it cannot generate from text alone")
        h, w = self._grid(first.height, first.width)
        seeds = [s for j in jobs for s in j.seeds]
        halves = 2 if first.guidance > 1 and first.embeddings.negative_prompt_embeds is not None else 1
        embeds, mask = self._text(jobs, halves)
        # Each job's reference images, packed and side by side in the
        # sequence, once per image of the job (jobs of one batch have equal grids).
        rows = []
        for job in jobs:
            packed = [self._pack(torch.from_numpy(ref)) for ref in job.edit.references]
            rows += [torch.cat(packed, dim=1)] * len(job.seeds)
        references = torch.cat(rows).to(self.device, self.dtype)
        grids = [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in first.edit.references]
        # The shift counts the generated image's tokens only, as the pipelines do.
        scheduler, timesteps = self._schedule(first.steps, (h // 2) * (w // 2))
        return _Run(
            scheduler=scheduler,
            timesteps=timesteps,
            latents=self._noise(seeds, h, w),
            embeds=embeds,
            mask=mask,
            img_shapes=[[(1, h // 2, w // 2), *grids]] * (len(seeds) * halves),
            halves=halves,
            true_cfg_scale=first.guidance,
            references=references,
        )

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        n, c, h, w = latents.shape
        return self.diffusers_pipeline._pack_latents(latents, n, c, h, w)

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        super().load_vae()
        # diffusers' own image preprocessing and VAE encoding (mode of the
        # distribution, then normalised per channel), on a pipeline object holding only the VAE.
        self.vae_pipe = self.diffusers_pipeline(
            scheduler=None, vae=self.vae, text_encoder=None, tokenizer=None, processor=None, transformer=None
        )

    @torch.inference_mode()
    def encode_image(
        self, pixels: np.ndarray, alpha: np.ndarray | None = None, references: list[np.ndarray] | None = None
    ) -> EditLatents:
        """Each input image, as sent, at about a megapixel with its aspect ->
        its normalised latents (1, 16, h, w): the reference tokens."""
        if alpha is not None:
            raise EditsUnsupported(f"{type(self).__name__} edits whole images; a mask is not supported")
        latents = []
        for image_pixels in references if references is not None else [pixels]:
            image = Image.fromarray(image_pixels)
            width, height = self._size(_VAE_IMAGE_AREA, image)
            tensor = self.vae_pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
            z = self.vae_pipe._encode_vae_image(tensor.to(self.device, self.vae_dtype), generator=None)
            latents.append(z[:, :, 0].float().cpu().numpy())
        return EditLatents(references=latents)


class QwenImageEditPlusArchitecture(QwenImageEditArchitecture):
    """Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``, 2509 and later):
    several input images, each seen by the text encoder at about 384x384 and
    appended to the denoiser's sequence at about a megapixel."""

    # The model card's advice: one to three images work best.
    edit_inputs: ClassVar[EditInputs] = EditInputs(max_images=3, text_sees_images=True, references=True)
    diffusers_pipeline: ClassVar[type] = QwenImageEditPlusPipeline
    condition_area: ClassVar[int | None] = 384 * 384
