"""The embedded model's scene generator (serve_app/pipeline/scenes.py): what
training draws and what its shape-weighted loss is told about each scene."""

from __future__ import annotations

import random

import numpy as np

from serve_app.pipeline.scenes import COLOURS, random_scene, render, render_mask


def test_the_shape_mask_covers_exactly_the_pixels_drawn_in_a_shape_colour():
    rng = random.Random(3)
    for _ in range(20):
        scene = random_scene(rng, two_shapes=0.5)
        pixels = np.asarray(render(scene, 128)).astype(int)
        mask = np.asarray(render_mask(scene, 128))
        assert set(np.unique(mask)) <= {0, 255}
        background = np.all(pixels == COLOURS[scene.background], axis=-1)
        # Shapes never take the background's colour, so the two partitions agree.
        assert np.array_equal(mask == 255, ~background)
        assert 0 < (mask == 255).mean() < 0.5
