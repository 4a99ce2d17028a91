"""The functional cores of every technique, in one namespace: plain functions over tensors, modules and optimizers,
no Lightning needed (``from lightning_techniques.functional import lsuv_init, grad_cam, lr_at``).

Each technique is a functional core plus a thin Lightning adapter (see ``ARCHITECTURE.md``); the adapters are the
top-level classes of :mod:`lightning_techniques`, the cores live here. Users of plain PyTorch call these directly;
the unit tests check them against the papers' formulas and reference libraries.
"""

from __future__ import annotations

import inspect as _inspect

from lightning_techniques import augment as _augment
from lightning_techniques import data as _data
from lightning_techniques import evaluation as _evaluation
from lightning_techniques import finetune as _finetune
from lightning_techniques import init as _init
from lightning_techniques import interpret as _interpret
from lightning_techniques import normalization as _normalization
from lightning_techniques import optim as _optim
from lightning_techniques import regularization as _regularization
from lightning_techniques import reproducibility as _reproducibility

_AREAS = (_augment, _data, _evaluation, _finetune, _init, _interpret, _normalization, _optim, _regularization, _reproducibility)

__all__ = sorted(
    {name for area in _AREAS for name in area.__all__ if _inspect.isfunction(getattr(area, name))}
)

for _area in _AREAS:
    for _name in _area.__all__:
        if _name in __all__:
            globals()[_name] = getattr(_area, _name)
del _area, _name
