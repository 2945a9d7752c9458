"""The seam between the generic stage deployments and one model architecture.

Each architecture (Stable Diffusion 1.x/2.x and SDXL, SD3, FLUX, ...) is one
module in this package with one :class:`Architecture` subclass that says,
for each of our three model stages, which files it needs, what it loads
and what it does. The stage deployments (TextEncoder, Denoiser, VaeDecoder)
hold an architecture object and call only these methods; no stage code
asks which architecture it runs.

One instance serves one stage in one replica: a stage calls its own
``load_*`` method and then only that stage's methods, so a replica holds
only its own components. Everything that crosses between stages is one of
the small data classes in :mod:`serve_app.pipeline.types`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal

import numpy as np
import torch

from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.sources import SourceFiles
from serve_app.pipeline.types import DenoiseJob, EditInputs, EditLatents, EditsUnsupported, PromptEmbeddings

Stage = Literal["text_encoder", "denoiser", "vae_decoder"]


class Architecture:
    # Files each stage needs, as fnmatch globs relative to the pipeline root
    # (serve_app.pipeline.sources.SourceFiles patterns; "*" also matches "/").
    text_files: ClassVar[tuple[str, ...]] = ()
    denoiser_files: ClassVar[tuple[str, ...]] = ()
    vae_files: ClassVar[tuple[str, ...]] = ()
    # Components model_index.json must list.
    required_components: ClassVar[tuple[str, ...]] = ()
    # What its edits take (the ingress asks the text stage for it).
    edit_inputs: ClassVar[EditInputs] = EditInputs()

    def __init__(self, layout: PipelineLayout, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.device = device
        self.dtype = dtype

    @classmethod
    def files(cls, stage: Stage) -> SourceFiles:
        """What one stage fetches of a remote source (named for its cache folder)."""
        patterns = {"text_encoder": cls.text_files, "denoiser": cls.denoiser_files, "vae_decoder": cls.vae_files}[stage]
        return SourceFiles(stage, patterns)

    # --- text encoder stage -------------------------------------------------
    def load_text(self) -> None:
        """Load the tokenizer(s) and text encoder(s) only."""
        raise NotImplementedError

    def encode(
        self, prompt: str, negative_prompt: str = "", count_prompt: str | None = None, images: list[np.ndarray] | None = None
    ) -> PromptEmbeddings:
        """Embeddings of one prompt (and, where the architecture uses true
        guidance, of the negative prompt); ``token_count`` counts
        ``count_prompt`` (default ``prompt``) in the model's own tokenizer;
        ``encoded_prompt`` is the prompt as written, cut where the encoder's
        window ends. ``images``: an edit's input images (HxWx3 uint8, as
        sent), given only where ``edit_inputs.text_sees_images``."""
        raise NotImplementedError

    def probe_text(self) -> bool:
        """Encode the empty prompt; True when finite (check_health)."""
        raise NotImplementedError

    # --- denoiser stage -------------------------------------------------------
    def load_denoiser(self) -> None:
        """Load the denoising network and the scheduler only (configs of other components may be read)."""
        raise NotImplementedError

    def denoise(self, jobs: list[DenoiseJob], preview_steps: set[int], every_step: bool) -> Iterator[tuple[str, np.ndarray | None]]:
        """Denoise jobs that share ``DenoiseJob.batch_key()`` as one batch.

        Yields ("preview", predicted clean latents for every image) after each
        step listed in ``preview_steps`` (1-based, never the last), ("step",
        None) after every step when ``every_step``, and ("final", latents)
        last: an (images, ...) array in job order, as the VAE stage decodes
        it. Each image's initial noise is drawn from its own seed on a CPU
        generator, so an image depends only on its seed, not on its batch.
        ``torch.inference_mode`` is entered per step, never across a yield.
        """
        raise NotImplementedError

    def steps_for(self, job: DenoiseJob) -> int:
        """How many steps a job runs (an edit runs only the tail of the schedule)."""
        return job.steps

    def check_job(self, job: DenoiseJob) -> None:
        """Raise ``NeedsInputImage`` for a job this model cannot run; called
        per job before it joins a batch, so that it fails alone."""

    def probe_denoiser(self) -> bool:
        raise NotImplementedError

    # --- VAE stage --------------------------------------------------------------
    def load_vae(self) -> None:
        raise NotImplementedError

    def _load_vae_module(self) -> None:
        """``self.vae`` and ``self.vae_dtype``: a VAE whose config asks for
        float32 (``force_upcast``, e.g. SDXL's) overflows in float16, so it
        stays in float32 whatever the stage's dtype."""
        vae = self.layout.load("vae", dtype=self.dtype, device=self.device)
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae = vae.to(torch.float32)
        self.vae = vae
        self.vae_dtype = next(vae.parameters()).dtype

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """The denoiser's final (or preview) latents -> (n, H, W, 3) uint8 RGB."""
        raise NotImplementedError

    def encode_image(
        self, pixels: np.ndarray, alpha: np.ndarray | None = None, references: list[np.ndarray] | None = None
    ) -> EditLatents:
        """An edit's input (HxWx3 uint8 at the output size; alpha HxW uint8,
        0 = edit) -> what the denoiser starts from. ``references``: every
        input image as sent (HxWx3 uint8), given only where
        ``edit_inputs.references``."""
        raise EditsUnsupported(f"{type(self).__name__} does not edit images")

    def probe_vae(self) -> bool:
        raise NotImplementedError


class FlowMatchingArchitecture(Architecture):
    """The denoising loop of the flow-matching architectures (SD3, FLUX.1,
    FLUX.2, Qwen-Image, Z-Image), written once.

    Our own loop rather than the diffusers pipelines' ``__call__``: we stop
    between steps (cancellation), yield clean-image estimates (previews),
    and run several requests' images as one batch, each with its own prompt
    and seed; ``__call__`` offers only a step callback, cannot yield, and
    takes one prompt's embeddings per call. Each step is still diffusers'
    own: the transformer, the pipeline's guidance formula and the
    scheduler's step. An architecture says how a batch starts
    (``_prepare``: a run with ``scheduler``, ``timesteps``, ``latents`` and
    ``inpaint``, plus whatever its transformer takes), how its transformer
    gives the guided velocity (``_velocity``), and in what layout latents
    leave the stage (``_latents_out``).
    """

    def _prepare(self, jobs: list[DenoiseJob]):
        raise NotImplementedError

    def _velocity(self, run, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's velocity (noise - x0) for ``latents`` at ``t``, guidance applied."""
        raise NotImplementedError

    def _latents_out(self, latents: torch.Tensor, jobs: list[DenoiseJob]) -> np.ndarray:
        """Latents as the VAE stage takes them (and previews are decoded): float32 NumPy."""
        return latents.float().cpu().numpy()

    def denoise(self, jobs: list[DenoiseJob], preview_steps: set[int], every_step: bool) -> Iterator[tuple[str, np.ndarray | None]]:
        # inference_mode is per thread and a generator may be resumed on
        # another thread, so it is entered per step, never across a yield.
        with torch.inference_mode():
            run = self._prepare(jobs)
        steps = len(run.timesteps)
        for i, t in enumerate(run.timesteps, start=1):
            with torch.inference_mode():
                noisy = run.latents
                v = self._velocity(run, noisy, t)
                latents = run.scheduler.step(v, t, noisy, return_dict=False)[0]
                if run.inpaint is not None:
                    latents = run.inpaint.after_step(latents, run.scheduler, run.timesteps, i)
                run.latents = latents
                preview = None
                if i in preview_steps and i < steps:
                    # The clean-image estimate of flow matching: x_t = (1 - s) x0 + s e
                    # and v = e - x0 give x0 = x_t - s v, s the sigma of the step just taken.
                    sigma = run.scheduler.sigmas[run.scheduler.step_index - 1].to(noisy.device, torch.float32)
                    x0 = noisy.float() - sigma * v.float()
                    if run.inpaint is not None:
                        x0 = run.inpaint.preview(x0)
                    preview = self._latents_out(x0, jobs)
            if preview is not None:
                yield "preview", preview
            if every_step:
                yield "step", None
        with torch.inference_mode():
            final = self._latents_out(run.latents, jobs)
        yield "final", final


# --- helpers every architecture's stages share ---------------------------------

# OpenAI's mask marks where to edit with alpha 0. diffusers' inpaint
# pipelines binarize their mask at one half; alpha below this is "edit".
EDIT_ALPHA_BELOW = 128


def edit_start(steps: int, strength: float) -> int:
    """Index of the first step a flow-matching edit (SD3, FLUX, Z-Image
    img2img) runs. Their pipelines' ``get_timesteps`` round ``steps *
    strength`` down only after subtracting it from ``steps``, where SD
    1.x/2.x's rounds it first (``serve_app.pipeline.types.edit_steps``), so
    the two disagree for, say, 4 steps at strength 0.6 (3 steps here, 2 there)."""
    return int(max(steps - min(steps * strength, steps), 0))


@dataclass
class FlowInpaint:
    """Inpainting with an ordinary flow-matching transformer, as diffusers'
    SD3, FLUX.1 and Z-Image inpaint pipelines do it: after every step the
    input goes back, noised to the next step's level, wherever the mask
    keeps it. The tensors are in whatever layout the loop steps (FLUX packs
    them); ``mask`` is 1 where to repaint and broadcasts over the latents."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor

    def after_step(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, i: int) -> torch.Tensor:
        """Latents after step ``i`` (1-based) of ``timesteps`` -> with the kept region put back."""
        keep = self.image_latents
        if i < len(timesteps):
            keep = scheduler.scale_noise(keep, timesteps[i : i + 1], self.noise)
        return (1 - self.mask) * keep + self.mask * latents

    def preview(self, x0: torch.Tensor) -> torch.Tensor:
        """A clean-image estimate with the kept region as it will end: the input's."""
        return (1 - self.mask) * self.image_latents + self.mask * x0


def repaint_mask(alpha: np.ndarray) -> np.ndarray:
    """OpenAI's mask alpha (HxW uint8, 0 = edit) -> diffusers' binary mask (1 = repaint), float32."""
    return (alpha < EDIT_ALPHA_BELOW).astype(np.float32)


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) float32 in [-1, 1], as diffusers' image processor makes it (x / 255, then 2x - 1)."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0


def prompt_embeddings(
    embeds: torch.Tensor,
    negative: torch.Tensor | None,
    pooled: torch.Tensor | None,
    negative_pooled: torch.Tensor | None,
    *,
    token_count: int,
    truncated: bool,
    encoded_prompt: str,
) -> PromptEmbeddings:
    """A text stage's tensors -> the float32 NumPy data class that crosses to the denoiser."""

    def to_np(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.float().cpu().numpy()

    return PromptEmbeddings(
        prompt_embeds=to_np(embeds),
        negative_prompt_embeds=to_np(negative),
        pooled_prompt_embeds=to_np(pooled),
        negative_pooled_prompt_embeds=to_np(negative_pooled),
        token_count=token_count,
        truncated=truncated,
        encoded_prompt=encoded_prompt,
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """A VAE's (n, 3, H, W) output in [-1, 1] -> (n, H, W, 3) uint8, as diffusers' postprocess rounds it."""
    images = (images / 2 + 0.5).clamp(0, 1)
    return np.ascontiguousarray((images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy())


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
