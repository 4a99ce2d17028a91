"""Regularisation techniques."""

from lightning_techniques.regularization.activation_noise import (
    ActivationDropout,
    ActivationNoise,
    activation_noise,
    dropout_mask,
)
from lightning_techniques.regularization.adversarial import (
    AdversarialTraining,
    VirtualAdversarialTraining,
    fgsm,
    input_gradient,
    pgd,
    preserved_batchnorm_stats,
    vat_loss,
    vat_perturbation,
)
from lightning_techniques.regularization.dropout import (
    DropoutSchedule,
    MCDropout,
    dropout_layers,
    mc_dropout_predict,
    scheduled_dropout,
)
from lightning_techniques.regularization.early_stopping import EarlyStopping
from lightning_techniques.regularization.label_smoothing import LabelSmoothing, smooth_targets
from lightning_techniques.regularization.noise import WeightNoise, perturb_weights_, restore_weights_
from lightning_techniques.regularization.penalties import (
    L1Penalty,
    L2Penalty,
    penalty_parameters,
    warmup_coefficient,
    weight_penalty,
)

__all__ = [
    "ActivationDropout",
    "ActivationNoise",
    "AdversarialTraining",
    "DropoutSchedule",
    "EarlyStopping",
    "L1Penalty",
    "L2Penalty",
    "LabelSmoothing",
    "MCDropout",
    "VirtualAdversarialTraining",
    "WeightNoise",
    "activation_noise",
    "dropout_layers",
    "dropout_mask",
    "fgsm",
    "input_gradient",
    "mc_dropout_predict",
    "penalty_parameters",
    "perturb_weights_",
    "pgd",
    "preserved_batchnorm_stats",
    "restore_weights_",
    "scheduled_dropout",
    "smooth_targets",
    "vat_loss",
    "vat_perturbation",
    "warmup_coefficient",
    "weight_penalty",
]
