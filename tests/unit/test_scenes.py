"""The embedded model's scene generator (serve_app/pipeline/scenes.py): what
training draws, what its shape-weighted loss is told about each scene, and
the scorer the evaluation measures pictures with."""

from __future__ import annotations

import random

import numpy as np
import pytest

from serve_app.pipeline.scenes import (
    COLOURS, FILL_RATIOS, POSITIONS, SHAPES, SIZES, Scene, Shape, random_scene, render, render_mask, score,
)


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


@pytest.mark.parametrize("resolution", [256, 512])
def test_the_scorer_reads_every_drawn_scene_as_what_it_is(resolution):
    # A perfect picture must score right on every count, at both sizes the
    # evaluation uses: a scorer that misreads one caps whatever model it measures.
    for kind in SHAPES:
        for size in SIZES:
            for position in POSITIONS:
                scene = Scene("blue", (Shape(kind, "yellow", size, position),))
                result = score(np.asarray(render(scene, resolution)), scene)
                assert (result.background, result.colour, result.shape, result.position) == (True,) * 4, result.found
                # The fill ratio itself, not only the nearest kind: a box
                # between the 1st and 99th percentiles read perfect circles
                # as 0.88, still nearer 0.79 than 1, but a little blur away
                # from reading as squares. (A triangle's apex rows, with
                # fewer pixels than the threshold, are left out: 0.55.)
                assert abs(result.fill - FILL_RATIOS[kind]) < 0.06, (kind, size, position, result.fill)


def test_the_scorer_tells_a_wrong_shape_and_place_in_the_asked_colour():
    # The asked colour is drawn, as the wrong kind in the wrong place: the
    # kind and position are measured (not missing), and the colour where the
    # shape should be is the background's.
    asked = Scene("white", (Shape("circle", "red", "large", "top left"),))
    drawn = Scene("white", (Shape("square", "red", "large", "bottom right"),))
    result = score(np.asarray(render(drawn, 256)), asked)
    assert result.found == "white/white square bottom right"
    assert result.background and not (result.colour or result.shape or result.position)
