from __future__ import annotations

import numpy as np

from serve_app.matting import BackdropMatting


def shaded_disc(n=128, radius=0.3, backdrop=(0.95, 0.95, 0.95)):
    """A shaded disc with an anti-aliased edge on a flat backdrop, and its true coverage."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    r = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    coverage = np.clip((radius - r) * n / 2 + 0.5, 0, 1)  # ~2 px soft edge
    disc = np.stack([0.2 + 0.6 * xx, 0.3 + 0.2 * yy, 0.1 + 0 * xx], -1)
    img = np.array(backdrop) * (1 - coverage[..., None]) + disc * coverage[..., None]
    return (img * 255).round().astype(np.uint8), coverage


def test_disc_on_flat_backdrop():
    rgb, coverage = shaded_disc()
    rgba = BackdropMatting().matte(rgb)
    assert rgba.shape == (128, 128, 4) and rgba.dtype == np.uint8
    alpha = rgba[..., 3].astype(int)
    assert alpha[coverage > 0.999].min() >= 250  # inside
    assert alpha[coverage < 0.001].max() <= 5  # outside
    edge = alpha[(coverage > 0.3) & (coverage < 0.7)]
    assert edge.size > 0 and ((edge > 20) & (edge < 235)).mean() > 0.8  # soft, intermediate edge
    assert np.corrcoef(alpha[(coverage > 0) & (coverage < 1)], coverage[(coverage > 0) & (coverage < 1)])[0, 1] > 0.8


def test_edge_colour_is_unmixed_from_backdrop():
    rgb, coverage = shaded_disc()
    rgba = BackdropMatting().matte(rgb)
    edge = (coverage > 0.2) & (coverage < 0.5)
    # The observed edge pixels are mostly backdrop (bright); the estimated foreground is not.
    assert rgba[..., :3][edge].mean() < rgb[edge].mean() - 40


def test_flat_image_is_all_background():
    rgba = BackdropMatting().matte(np.full((64, 64, 3), 200, np.uint8))
    assert rgba[..., 3].max() == 0
