"""Putting an edit's protected pixels back: the finishing step of an inpainting edit.

The denoiser keeps the protected region in latent space, but the VAE's
round trip still changes those pixels a little. OpenAI's promise is that a
mask protects what it covers, so after decoding the input's own pixels are
put back wherever the mask is opaque, with a short blend into the edited
region so that no seam shows.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt


def keep_weight(alpha: np.ndarray, feather_px: int) -> np.ndarray:
    """How much of the input to keep at each pixel (HxW float32, 0..1).

    1 wherever the mask is opaque (alpha 255), so those pixels are the
    input's exactly; alpha/255 where the mask is partly transparent; and in
    the edited region within ``feather_px`` of an opaque pixel, a ramp down
    from 1, so the blend lies only on the edited side of the border.
    """
    weight = alpha.astype(np.float32) / 255.0
    protected = alpha == 255
    if feather_px > 0 and protected.any() and not protected.all():
        distance = distance_transform_edt(~protected)  # to the nearest opaque pixel
        ramp = np.clip(1.0 - distance / (feather_px + 1), 0.0, 1.0).astype(np.float32)
        weight = np.maximum(weight, ramp)
    weight[protected] = 1.0
    return weight


def composite(generated: np.ndarray, original: np.ndarray, alpha: np.ndarray, feather_px: int) -> np.ndarray:
    """``generated`` HxWx3 (or 4) uint8 with the input's pixels put back where ``alpha`` protects them."""
    weight = keep_weight(alpha, feather_px)[..., None]
    rgb = generated[..., :3].astype(np.float32)
    blended = np.rint(weight * original[..., :3].astype(np.float32) + (1.0 - weight) * rgb).astype(np.uint8)
    # Exact copies where fully protected: no float rounding can touch them.
    blended = np.where(weight == 1.0, original[..., :3], blended)
    if generated.shape[-1] == 4:
        return np.concatenate([blended, generated[..., 3:]], axis=-1)
    return blended
