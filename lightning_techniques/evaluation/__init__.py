"""Evaluation reports and importance measures."""

from lightning_techniques.evaluation.importance import (
    PermutationImportance,
    ablation_importance,
    permutation_importance,
)
from lightning_techniques.evaluation.report import (
    EvaluationReport,
    bootstrap_ci,
    classification_report,
    classification_scalars,
    regression_scalars,
    reliability_bins,
)

__all__: list[str] = [
    "EvaluationReport",
    "PermutationImportance",
    "ablation_importance",
    "bootstrap_ci",
    "classification_report",
    "classification_scalars",
    "permutation_importance",
    "regression_scalars",
    "reliability_bins",
]
