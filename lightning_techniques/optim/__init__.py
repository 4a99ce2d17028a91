"""Optimisation: optimizers, LR schedules, clipping, accumulation, mixed precision, non-finite guard."""

__all__: list[str] = []

# --- optimizers and learning-rate schedules ---
from lightning_techniques.optim.optimizers import (  # noqa: E402
    CombinedOptimizer,
    DistributedLBFGS,
    OptimizerCallback,
    build_optimizer,
    decay_param_groups,
)
from lightning_techniques.optim.schedules import (  # noqa: E402
    AgreedReduceLROnPlateau,
    LRSchedule,
    ReduceLROnPlateau,
    lr_at,
)

__all__ += [
    "AgreedReduceLROnPlateau",
    "CombinedOptimizer",
    "DistributedLBFGS",
    "LRSchedule",
    "OptimizerCallback",
    "ReduceLROnPlateau",
    "build_optimizer",
    "decay_param_groups",
    "lr_at",
]

# --- clipping, accumulation, precision, non-finite guard ---
from lightning_techniques.optim.accumulation import AccumulationScheduler  # noqa: E402
from lightning_techniques.optim.clipping import AdaptiveGradientClipping, AutoClip  # noqa: E402
from lightning_techniques.optim.guard import NonFiniteGuard, NonFiniteTrainingError  # noqa: E402
from lightning_techniques.optim.precision import SmartMixedPrecision  # noqa: E402

__all__ += [
    "AccumulationScheduler",
    "AdaptiveGradientClipping",
    "AutoClip",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "SmartMixedPrecision",
]
