"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` and its img2img and
inpaint variants) on our three model stages.

- Text: CLIP-L and CLIP-G (penultimate hidden states side by side, zero-padded
  to T5's width) followed by T5's hidden states along the sequence; the two
  CLIP pooled outputs concatenated. diffusers' own ``encode_prompt`` does
  this, on a pipeline object that holds only the text components.
- Denoiser: an MMDiT (``SD3Transformer2DModel``) predicting the flow-matching
  velocity, stepped by ``FlowMatchEulerDiscreteScheduler``, with true
  classifier-free guidance (negative and positive prompts as one batch).
- VAE: a 16-channel ``AutoencoderKL`` whose latents are shifted as well as
  scaled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.pipeline.architectures.base import FlowInpaint, FlowMatchingArchitecture, edit_start, kept_text, prompt_embeddings, repaint_mask
from serve_app.pipeline.components import ModelLayoutError
from serve_app.pipeline.types import DenoiseJob, EditLatents, PromptEmbeddings



class SD3Architecture(FlowMatchingArchitecture):
    # tokenizer, tokenizer_2, tokenizer_3 and text_encoder, _2, _3.
    text_files = ("model_index.json", "tokenizer*/*", "text_encoder*/*")
    # The VAE's config gives the latent grid's downsampling and the latents' scale and shift.
    denoiser_files = ("model_index.json", "transformer/*", "scheduler/*", "vae/config.json")
    vae_files = ("model_index.json", "vae/*")
    required_components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")

    # T5 tokens encoded: diffusers' default for SD3 (it accepts up to 512).
    # Every request pays for the full length: T5's output is padded to it.
    max_sequence_length = 256

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        from diffusers import StableDiffusion3Pipeline

        if "text_encoder_3" not in self.layout.components:
            # diffusers can run SD3 without T5 (zeros in its place), but then
            # reads the width from the transformer, which this stage does not load.
            raise ModelLayoutError(f"{self.layout.root}: SD3 without its T5 encoder (text_encoder_3) is not supported")
        parts = {}
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            parts[name] = self.layout.load(name)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            parts[name] = self.layout.load(name, dtype=self.dtype, device=self.device)
        # A pipeline object holding only the text components, so that prompts
        # are encoded by diffusers' own encode_prompt and stay exactly as its
        # pipeline encodes them.
        self.text_pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)

    def encode(self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None) -> PromptEmbeddings:
        pipe = self.text_pipe
        # 1. Count tokens and find what the encoder's window keeps. T5's
        # tokenizer counts: it reads max_sequence_length - 1 tokens (plus its
        # end token), the longest window of the three, and carries most of
        # the prompt. The CLIP encoders keep only their first 75 tokens, as
        # in every SD3 pipeline; that is the model's design, not a cut the
        # client needs to hear about.
        tokenizer = pipe.tokenizer_3
        window = self.max_sequence_length - 1
        text_ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
        truncated = len(text_ids) > window
        encoded_prompt = kept_text(tokenizer, prompt, window) if truncated else prompt
        if count_prompt is None:
            counted = text_ids
        else:
            counted = tokenizer(count_prompt, truncation=False, add_special_tokens=False).input_ids

        # 2. Prompt and negative prompt: the negative always, since guidance
        # is the denoiser's decision and arrives with the job.
        with torch.inference_mode():
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=True,
                device=torch.device(self.device),
                max_sequence_length=self.max_sequence_length,
            )

        return prompt_embeddings(
            embeds, neg_embeds, pooled, neg_pooled,
            token_count=len(counted), truncated=truncated, encoded_prompt=encoded_prompt,
        )

    def probe_text(self) -> bool:
        e = self.encode("")
        return bool(np.isfinite(e.prompt_embeds).all() and np.isfinite(e.pooled_prompt_embeds).all())

    # --- denoiser stage -------------------------------------------------------
    def load_denoiser(self) -> None:
        self.transformer = self.layout.load("transformer", dtype=self.dtype, device=self.device)
        self.scheduler = self.layout.load("scheduler")
        vae = self.layout.component_config("vae")
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        self.scaling_factor = vae.get("scaling_factor", 1.5305)
        self.shift_factor = vae.get("shift_factor", 0.0609)

    def steps_for(self, job: DenoiseJob) -> int:
        return job.steps if job.edit is None else job.steps - edit_start(job.steps, job.strength)

    def probe_denoiser(self) -> bool:
        config = self.transformer.config
        side = 2 * config.patch_size
        with torch.inference_mode():
            out = self.transformer(
                hidden_states=torch.zeros(1, config.in_channels, side, side, device=self.device, dtype=self.dtype),
                timestep=torch.tensor([500.0], device=self.device),
                encoder_hidden_states=torch.zeros(1, 4, config.joint_attention_dim, device=self.device, dtype=self.dtype),
                pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=self.device, dtype=self.dtype),
                return_dict=False,
            )[0]
        return bool(torch.isfinite(out).all())

    def _prepare(self, jobs: list[DenoiseJob]) -> "_Run":
        return _Run(self, jobs)

    def _velocity(self, run: "_Run", latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_in = torch.cat([latents] * 2) if run.guided else latents
        velocity = self.transformer(
            hidden_states=model_in,
            timestep=t.expand(model_in.shape[0]),
            encoder_hidden_states=run.cond,
            pooled_projections=run.pooled,
            return_dict=False,
        )[0]
        if run.guided:
            uncond, text = velocity.chunk(2)
            velocity = uncond + run.guidance * (text - uncond)
        return velocity

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self._load_vae_module()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        config = self.vae.config
        with torch.inference_mode():
            z = torch.from_numpy(latents).to(self.device, self.vae_dtype)
            images = self.vae.decode(z / config.scaling_factor + config.shift_factor, return_dict=False)[0]
            # diffusers' postprocess to [0, 1]; then to bytes as its numpy_to_pil does.
            images = self.image_processor.postprocess(images, output_type="pt")
            pixels = (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
        return np.ascontiguousarray(pixels.cpu().numpy())

    def encode_image(self, pixels: np.ndarray, alpha: np.ndarray | None = None) -> EditLatents:
        height, width = pixels.shape[:2]
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"image size {width}x{height} is not a multiple of the VAE's {f}")
        with torch.inference_mode():
            # To [-1, 1] as diffusers' image processor does (float32 / 255, then 2x - 1).
            image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255.0
            image = self.image_processor.normalize(image)
            dist = self.vae.encode(image.to(self.device, self.vae_dtype)).latent_dist
            latents = EditLatents(mean=dist.mean.float().cpu().numpy(), std=dist.std.float().cpu().numpy())
        if alpha is not None:
            # The repaint mask at latent size, nearest-neighbour, as SD3's inpaint pipeline resizes it.
            repaint = torch.from_numpy(repaint_mask(alpha))[None, None]
            latents.mask = F.interpolate(repaint, size=(height // f, width // f)).numpy()
        return latents

    def probe_vae(self) -> bool:
        with torch.inference_mode():
            z = torch.zeros(1, self.vae.config.latent_channels, 4, 4, device=self.device, dtype=self.vae_dtype)
            return bool(torch.isfinite(self.vae.decode(z, return_dict=False)[0]).all())


class _Run:
    """One batch's conditioning, schedule and starting latents.

    Randomness is drawn per image on its own seeded CPU generator, in the
    order diffusers' SD3 pipelines draw it with a list of generators: for an
    edit, the input's latent sample and then the noise; otherwise the noise.
    So an image depends only on its seed (and input), never on its batch.
    """

    def __init__(self, arch: SD3Architecture, jobs: list[DenoiseJob]):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        first = jobs[0]
        device, dtype = arch.device, arch.dtype
        # The batch shares its guidance (DenoiseJob.batch_key); SD3 guides above 1.
        self.guidance = first.guidance
        self.guided = guided = first.guidance > 1.0

        def per_image(field: str) -> torch.Tensor:
            # Each job's (1, ...) embedding once per image, jobs in order.
            parts = [torch.from_numpy(getattr(j.embeddings, field)).repeat_interleave(len(j.seeds), dim=0) for j in jobs]
            return torch.cat(parts).to(device, dtype)

        # 1. Conditioning: negative prompts first, then the prompts, as one batch.
        self.cond = per_image("prompt_embeds")
        self.pooled = per_image("pooled_prompt_embeds")
        if guided:
            self.cond = torch.cat([per_image("negative_prompt_embeds"), self.cond])
            self.pooled = torch.cat([per_image("negative_pooled_prompt_embeds"), self.pooled])

        # 2. A scheduler of its own per batch (schedulers keep per-run state),
        # its shift from the image's token count where the config asks for it.
        self.scheduler = scheduler = type(arch.scheduler).from_config(arch.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            patch = arch.transformer.config.patch_size
            tokens = (first.height // arch.vae_scale_factor // patch) * (first.width // arch.vae_scale_factor // patch)
            kwargs["mu"] = calculate_shift(
                tokens,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, first.steps, device, **kwargs)

        # 3. Starting latents.
        f = arch.vae_scale_factor
        shape = (1, arch.transformer.config.in_channels, first.height // f, first.width // f)
        self.inpaint = None
        if first.edit is None:
            seeds = [s for j in jobs for s in j.seeds]
            noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
            self.timesteps = timesteps
            self.latents = torch.cat(noise).to(device, dtype)
            return
        start = edit_start(first.steps, first.strength) * scheduler.order
        scheduler.set_begin_index(start)
        self.timesteps = timesteps[start:]
        samples, noise, masks = [], [], []
        for job in jobs:
            e = job.edit
            mean, std = torch.from_numpy(e.mean), torch.from_numpy(e.std)
            for seed in job.seeds:
                g = torch.Generator("cpu").manual_seed(seed)
                samples.append(mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float32))
                noise.append(torch.randn(mean.shape, generator=g, dtype=torch.float32))
                if e.mask is not None:
                    masks.append(torch.from_numpy(e.mask))
        image_latents = ((torch.cat(samples) - arch.shift_factor) * arch.scaling_factor).to(device, dtype)
        noise = torch.cat(noise).to(device, dtype)
        if masks:
            self.inpaint = FlowInpaint(image_latents, noise, torch.cat(masks).to(device, dtype))
        if len(self.timesteps) == 0:
            self.latents = image_latents  # strength 0: the input itself
        elif masks and first.strength == 1.0:
            self.latents = noise  # diffusers' SD3 inpaint starts from pure noise at full strength
        else:
            self.latents = scheduler.scale_noise(image_latents, self.timesteps[:1].repeat(len(noise)), noise)
