"""scripts/soak.py's memory verdict: growth per half, flagging only a second half that keeps growing."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def soak():
    sys.path.insert(0, str(SCRIPTS))  # soak.py imports its neighbour local_graph
    try:
        yield importlib.import_module("soak")
    finally:
        sys.path.remove(str(SCRIPTS))


def series(levels, step=10.0):
    """(t, rss, uss) samples every `step` s; USS is RSS - 100."""
    return [(i * step, float(v), float(v) - 100) for i, v in enumerate(levels)]


def test_warm_up_growth_in_the_first_half_is_reported_not_flagged(soak):
    # 400 -> 1000 MB over the first quarter, then flat for the rest of a 10-minute run.
    levels = [400 + 40 * i for i in range(16)] + [1000] * 45
    g = soak.half_growth(series(levels), growth_pct=5)
    assert g["rss_first_half_mb"] == 480  # median of the first tenth (520) to the middle (1000)
    assert g["rss_second_half_mb"] == 0
    assert g["flagged"] is False


def test_growth_that_goes_on_in_the_second_half_is_flagged(soak):
    # 1000 MB at half time, +8 % by the end: a slow leak.
    levels = [1000 + 80 * max(0, i - 30) / 30 for i in range(61)]
    g = soak.half_growth(series(levels), growth_pct=5)
    assert 6 < g["rss_second_half_pct"] < 9
    assert g["uss_second_half_mb"] == g["rss_second_half_mb"]
    assert g["flagged"] is True
    # The same growth under a higher threshold, or below an MB floor, is not flagged.
    assert soak.half_growth(series(levels), growth_pct=10)["flagged"] is False
    assert soak.half_growth(series(levels), growth_pct=5, growth_mb=100)["flagged"] is False


def test_one_sample_on_a_large_request_in_flight_is_not_growth(soak):
    # Flat at 600 MB; the very last sample caught a 1024x1024 batch (+400 MB for a second).
    levels = [600] * 60 + [1000]
    g = soak.half_growth(series(levels), growth_pct=5)
    assert g["rss_second_half_mb"] == 0
    assert g["flagged"] is False


def test_a_short_run_with_few_samples_still_compares_its_halves(soak):
    # Three samples (a 20-s run): no window holds more than one, the nearest is used.
    g = soak.half_growth(series([500, 500, 560]), growth_pct=5)
    assert g["rss_second_half_mb"] == 60 and g["flagged"] is True
