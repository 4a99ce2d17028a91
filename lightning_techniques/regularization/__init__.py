"""Regularisation techniques."""

from lightning_techniques.regularization.early_stopping import EarlyStopping
from lightning_techniques.regularization.label_smoothing import LabelSmoothing, smooth_targets
from lightning_techniques.regularization.penalties import (
    L1Penalty,
    L2Penalty,
    penalty_parameters,
    warmup_coefficient,
    weight_penalty,
)

__all__ = [
    "EarlyStopping",
    "L1Penalty",
    "L2Penalty",
    "LabelSmoothing",
    "penalty_parameters",
    "smooth_targets",
    "warmup_coefficient",
    "weight_penalty",
]
