"""Transparent backgrounds: an alpha matte for an image on a plain backdrop.

:class:`Matting` is the interface the post-processor uses; a learned matting
model can replace :class:`BackdropMatting` by implementing ``matte``.

BackdropMatting assumes the model was asked for a plain backdrop (the
model's ``transparent_template``): it estimates the backdrop colour from the
image border, marks pixels close to it as background and far from it as
foreground, leaves a band between them unknown, and solves for a soft alpha
there with closed-form matting (pymatting), then re-estimates the foreground
colours so the backdrop does not bleed into the edges.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Matting(Protocol):
    def matte(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> HxWx4 uint8 with a real alpha channel."""


class BackdropMatting:
    def __init__(self, band_px: int = 3, border_frac: float = 0.02):
        self.band_px = band_px
        self.border_frac = border_frac

    def warm_up(self) -> None:
        """pymatting JIT-compiles on first use (numba; cached on disk after): pay that at startup."""
        yy, xx = np.mgrid[0:32, 0:32]
        disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 64)[..., None]
        self.matte(np.where(disc, 40, 230).astype(np.uint8).repeat(3, axis=2))

    def trimap(self, img: np.ndarray) -> np.ndarray:
        """1 = foreground, 0 = background, 0.5 = unknown; ``img`` is float RGB in [0, 1]."""
        from scipy import ndimage

        h, w, _ = img.shape
        b = max(2, int(round(min(h, w) * self.border_frac)))
        border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
        backdrop = np.median(border, axis=0)
        dist = np.linalg.norm(img - backdrop, axis=2) / np.sqrt(3)
        border_dist = np.linalg.norm(border - backdrop, axis=1) / np.sqrt(3)
        # Thresholds scale with how noisy the backdrop itself is.
        spread = float(np.median(np.abs(border_dist - np.median(border_dist)))) * 1.4826
        t_bg = max(0.03, float(np.median(border_dist)) + 3 * spread)
        t_fg = max(t_bg + 0.08, 0.12)
        structure = np.ones((3, 3), bool)
        fg = ndimage.binary_erosion(dist > t_fg, structure, iterations=self.band_px)
        bg = ndimage.binary_erosion(dist < t_bg, structure, iterations=self.band_px)
        trimap = np.full((h, w), 0.5)
        trimap[fg] = 1.0
        trimap[bg] = 0.0
        return trimap

    def matte(self, rgb: np.ndarray) -> np.ndarray:
        from pymatting import estimate_alpha_cf, estimate_foreground_ml

        img = rgb.astype(np.float64) / 255.0
        trimap = self.trimap(img)
        if not (trimap == 1.0).any():
            alpha = np.zeros(trimap.shape)  # nothing stands out from the backdrop
        elif not (trimap == 0.0).any():
            alpha = np.ones(trimap.shape)  # no backdrop to remove
        else:
            alpha = np.clip(estimate_alpha_cf(img, trimap), 0.0, 1.0)
        foreground = estimate_foreground_ml(img, alpha) if 0 < alpha.mean() < 1 else img
        rgba = np.concatenate([foreground, alpha[..., None]], axis=2)
        return (np.clip(rgba, 0.0, 1.0) * 255).round().astype(np.uint8)
