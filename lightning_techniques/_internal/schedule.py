"""The one schedule core: a value that moves from ``start`` to ``end`` as training progresses.

Every scheduled quantity of the package - the learning rate (``optim/schedules.py``), the input-noise scale
(``augment/input_noise.py``), the curriculum pool fraction (``data/curriculum.py``), the dropout rate
(``regularization/dropout.py``) and penalty warm-ups (``regularization/penalties.py``) - is ``interpolate(start, end,
progress(step, total), shape)`` plus what is specific to it (LR warm-up and restarts, one-cycle, pacing callables).
The design follows timm's and fastai's schedulers: a progress in ``[0, 1]`` and an annealing shape.

Shapes, with ``p`` the progress:

* ``"constant"``: ``start``
* ``"linear"``: ``start + (end - start) p``
* ``"cosine"``: ``end + (start - end) (1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017)
* ``"polynomial"``: ``end + (start - end) (1 - p)^power``
* ``"exponential"``: ``start (end / start)^p`` (geometric; both > 0)
* ``"root"``: ``sqrt(start^2 + (end^2 - start^2) p)`` (Platanios et al. 2019's square-root competence)
* ``"step"``: ``start + (end - start) floor(p stages) / stages`` (``stages`` equal jumps)
* ``"saturating"``: ``start + (end - start) (1 - exp(-rate p))`` (Morerio et al. 2017's curriculum dropout)
"""

from __future__ import annotations

import math
from typing import Literal

Shape = Literal["constant", "linear", "cosine", "polynomial", "exponential", "root", "step", "saturating"]
SHAPES: tuple[str, ...] = ("constant", "linear", "cosine", "polynomial", "exponential", "root", "step", "saturating")


def progress(step: float, total: float) -> float:
    """``min(max(step, 0) / total, 1)``; 1 when ``total <= 0`` (a schedule of no length is already at its end)."""
    if total <= 0:
        return 1.0
    return min(max(float(step), 0.0) / float(total), 1.0)


def interpolate(start: float, end: float, p: float, shape: str = "linear", *, power: float = 1.0, stages: int = 1,
                rate: float = 5.0) -> float:
    """The value at progress ``p`` in ``[0, 1]`` of a schedule from ``start`` (``p = 0``) to ``end`` (``p = 1``)."""
    if shape == "constant":
        return float(start)
    if shape == "linear":
        return start + (end - start) * p
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "polynomial":
        return end + (start - end) * (1.0 - p) ** power
    if shape == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError(f"an exponential schedule needs start > 0 and end > 0, got {start} and {end}.")
        return start * (end / start) ** p
    if shape == "root":
        return math.sqrt(start * start + (end * end - start * start) * p)
    if shape == "step":
        if stages < 1:
            raise ValueError(f"stages={stages} must be >= 1.")
        return start + (end - start) * math.floor(p * stages) / stages
    if shape == "saturating":
        return start + (end - start) * (1.0 - math.exp(-rate * p))
    raise ValueError(f"shape={shape!r} is not allowed; choose one of {list(SHAPES)}.")
