"""Per-batch seeds for the augmentation area: a pure function of ``(seed, global_step, micro-batch, rank)``.

Every random draw of an augmentation/noise/mixing callback comes from a generator seeded with :func:`derive_seed`
so that a run is reproducible, a resumed run draws exactly what the straight run drew (the global step is restored
from the checkpoint, the micro-batch counter restarts at 0 on a step boundary), and DDP ranks draw different
numbers. Area-internal helper.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_MASK = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SplitMix64 chained over ``parts``)."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK))
    return state >> 1


def default_seed(seed: int | None) -> int:
    """``seed``, else ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else 0."""
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class StepSeeder:
    """Seed for the current training micro-batch: ``derive_seed(seed, salt, global_step, micro, rank)``."""

    def __init__(self, seed: int, salt: int) -> None:
        self.seed = seed
        self.salt = salt
        self._step = -1
        self._micro = 0

    def next_seed(self, trainer: Any) -> int:
        step = int(trainer.global_step)
        if step == self._step:
            self._micro += 1
        else:
            self._step, self._micro = step, 0
        return derive_seed(self.seed, self.salt, step, self._micro, int(trainer.global_rank))


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)
