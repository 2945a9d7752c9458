"""Small data classes that cross deployment boundaries: NumPy arrays and plain values.

Ray moves NumPy arrays between processes without copying them through
pickle, and they carry no device: a CUDA tensor never leaves its stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptEmbeddings:
    """What the text encoder hands the denoiser for one prompt."""

    prompt_embeds: np.ndarray  # (1, tokens, dim) float32
    # (1, tokens, dim) float32, for classifier-free guidance; None where the
    # architecture runs without one (FLUX without a negative prompt).
    negative_prompt_embeds: np.ndarray | None
    pooled_prompt_embeds: np.ndarray | None = None  # (1, dim), SDXL and FLUX
    negative_pooled_prompt_embeds: np.ndarray | None = None  # (1, dim), SDXL and FLUX
    token_count: int = 0  # prompt tokens in the model's tokenizer, before truncation
    truncated: bool = False  # True when the prompt was cut at the encoder's window
    encoded_prompt: str = ""  # the text actually encoded (after truncation)


class EditsUnsupported(Exception):
    """The model's architecture cannot edit images (raised by its VAE stage;
    the ingress answers 400 naming the model). Here, not beside the
    architectures, so that the ingress can catch it without importing torch."""


@dataclass(frozen=True)
class EditInputs:
    """What an architecture's edits take, as the ingress learns it from the
    text-encoder stage (torch-free, so the ingress need not import the
    architectures)."""

    max_images: int = 1  # input images per edit; more is a 400 naming the image parameter
    # The edit's input images (RGB, as sent) also go to the text stage (a
    # vision-language encoder: Qwen-Image-Edit).
    text_sees_images: bool = False
    # The VAE stage encodes every input image, as sent, into reference
    # latents (EditLatents.references) instead of the first image at the output size.
    references: bool = False


class NeedsInputImage(Exception):
    """The model only edits (an inpainting UNet, FLUX.1 Fill): the denoiser
    refuses a job without an input image before it joins a batch, so that it
    fails alone; the ingress answers 400 naming the model."""


@dataclass
class EditLatents:
    """What the VAE encoder hands the denoiser for an edit.

    Image-to-image and inpainting: the encoder's latent distribution of the
    image to edit, not a sample of it: sampling draws on each image's seeded
    generator, and all of a request's randomness is drawn in the denoiser,
    in the order diffusers' pipelines draw it. Reference edits (FLUX.1
    Kontext, FLUX.2, Qwen-Image-Edit): ``references`` instead, and the edit
    starts from noise.
    """

    mean: np.ndarray | None = None  # (1, C, h, w) float32, unscaled (the VAE's own latent space)
    std: np.ndarray | None = None  # (1, C, h, w) float32
    # Inpainting: 1 where to repaint, 0 where to keep (diffusers' meaning), at
    # latent size: (1, 1, h, w) float32; for FLUX.1 Fill, whose transformer
    # reads the mask at pixel resolution, (1, 64, h, w): each latent cell's
    # 8x8 pixels as channels.
    mask: np.ndarray | None = None
    # Inpainting UNet, FLUX.1 Fill (mask and masked image given to the network
    # as extra input channels): the distribution of the image with the
    # repainted region blanked out.
    masked_mean: np.ndarray | None = None
    masked_std: np.ndarray | None = None
    # Reference edits: each input image's latents as this architecture's VAE
    # stage produces them (already normalised), (1, C, h, w) float32; the
    # denoiser packs them into extra tokens beside the generated ones.
    references: list[np.ndarray] | None = None

    @property
    def inpaint(self) -> bool:
        return self.mask is not None


@dataclass
class DenoiseJob:
    """One prompt, ``len(seeds)`` images of one size; with ``edit``, an edit
    of one image that starts ``strength`` of the way into the schedule."""

    embeddings: PromptEmbeddings
    seeds: list[int]
    height: int
    width: int
    steps: int
    guidance: float
    edit: EditLatents | None = None
    strength: float = 1.0
    # True classifier-free guidance for guidance-distilled models (FLUX.1),
    # whose ``guidance`` is an input of the network instead: above 1 and with
    # negative embeddings, each step also runs the negative prompt and mixes
    # the two as diffusers' ``true_cfg_scale``. Ignored by SD and SDXL.
    true_cfg_scale: float = 1.0

    def batch_key(self) -> tuple:
        """Jobs with equal keys can run as one batch: same grid, schedule and kind of work."""
        kind = None
        if self.edit is not None:
            # Reference tokens join the sequence: only equal reference grids stack.
            refs = None if self.edit.references is None else tuple(r.shape for r in self.edit.references)
            kind = (self.strength, self.edit.inpaint, refs)
        true_cfg = self.true_cfg_scale if self.embeddings.negative_prompt_embeds is not None else 1.0
        return (self.height, self.width, self.steps, self.guidance, kind, true_cfg)


def edit_steps(steps: int, strength: float) -> int:
    """How many denoising steps an edit of this strength runs: the last
    ``strength`` of a ``steps``-step schedule (diffusers' img2img rule)."""
    return min(int(steps * strength), steps)


def preview_steps(steps: int, partial_images: int) -> list[int]:
    """Evenly spaced steps (1-based, before the last) after which to send a preview.
    With fewer steps than previews asked for, fewer previews are sent, as
    OpenAI allows when the image is finished first."""
    if partial_images <= 0 or steps <= 1:
        return []
    return sorted({min(steps - 1, max(1, round((i + 1) * steps / (partial_images + 1)))) for i in range(partial_images)})
