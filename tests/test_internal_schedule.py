"""The one schedule core (lightning_techniques/_internal/schedule.py) that the LR schedule, the input-noise scale, the
curriculum pacing, the dropout schedule and the penalty warm-up all use."""

from __future__ import annotations

import math

import pytest

from lightning_techniques._internal.schedule import SHAPES, interpolate, progress
from lightning_techniques.functional import lr_at, pacing_fraction, scheduled_scale
from lightning_techniques.regularization.dropout import scheduled_dropout
from lightning_techniques.regularization.penalties import warmup_coefficient


@pytest.mark.parametrize("shape", [s for s in SHAPES if s not in ("constant", "saturating", "step")])
def test_every_shape_runs_from_start_to_end(shape: str) -> None:
    assert interpolate(0.5, 2.0, 0.0, shape) == pytest.approx(0.5)
    assert interpolate(0.5, 2.0, 1.0, shape) == pytest.approx(2.0)


def test_formulas_at_mid_progress() -> None:
    assert interpolate(1.0, 0.0, 0.5, "linear") == 0.5
    assert interpolate(1.0, 0.0, 0.5, "cosine") == pytest.approx(0.5)
    assert interpolate(1.0, 0.0, 0.25, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert interpolate(1.0, 0.0, 0.5, "polynomial", power=2.0) == pytest.approx(0.25)
    assert interpolate(0.25, 1.0, 0.5, "exponential") == pytest.approx(0.5)
    assert interpolate(0.2, 1.0, 0.5, "root") == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
    assert interpolate(0.0, 1.0, 0.6, "step", stages=4) == 0.5
    assert interpolate(0.0, 1.0, 1.0, "saturating", rate=5.0) == pytest.approx(1 - math.exp(-5))
    assert interpolate(3.0, 7.0, 0.9, "constant") == 3.0
    assert progress(5, 10) == 0.5 and progress(20, 10) == 1.0 and progress(-1, 10) == 0.0 and progress(3, 0) == 1.0


def test_bad_shape_and_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="shape='wavy' is not allowed"):
        interpolate(0.0, 1.0, 0.5, "wavy")
    with pytest.raises(ValueError, match="start > 0 and end > 0"):
        interpolate(0.0, 1.0, 0.5, "exponential")
    with pytest.raises(ValueError, match="stages"):
        interpolate(0.0, 1.0, 0.5, "step", stages=0)


def test_the_techniques_schedules_are_the_core() -> None:
    # LR: warm-up then the core's cosine from 1 to min_ratio
    assert lr_at(7, total=12, schedule="cosine", warmup_steps=2, min_ratio=0.1) == interpolate(1.0, 0.1, 0.5, "cosine")
    assert scheduled_scale(5, 10, 0.4, 0.0, "cosine") == interpolate(0.4, 0.0, 0.5, "cosine")
    assert pacing_fraction(50, 100, 0.2, "root") == interpolate(0.2, 1.0, 0.5, "root")
    assert scheduled_dropout(5, 0.5, 10) == interpolate(0.0, 0.5, 0.5, "linear")
    assert warmup_coefficient(5, 0.01, 10) == interpolate(0.0, 0.01, 0.5, "linear")
