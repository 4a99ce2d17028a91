"""Data-side techniques: curriculum learning and class imbalance."""

from lightning_techniques.data.curriculum import (
    CurriculumLearning,
    CurriculumSampler,
    curriculum_order,
    difficulty_ranking,
    pacing_fraction,
    per_sample_losses,
)
from lightning_techniques.data.imbalance import (
    ClassWeightedLoss,
    FocalLoss,
    Oversampling,
    class_weights,
    sample_weights,
    weighted_draw,
)
from lightning_techniques.data.labels import class_counts, find_labels
from lightning_techniques.data.resumable import (
    EpochPermutation,
    ResumableDataLoader,
    epoch_shuffle_sampler,
    resumable_loader,
)

__all__: list[str] = [
    "ClassWeightedLoss",
    "CurriculumLearning",
    "CurriculumSampler",
    "EpochPermutation",
    "FocalLoss",
    "Oversampling",
    "ResumableDataLoader",
    "class_counts",
    "class_weights",
    "curriculum_order",
    "difficulty_ranking",
    "epoch_shuffle_sampler",
    "find_labels",
    "pacing_fraction",
    "per_sample_losses",
    "resumable_loader",
    "sample_weights",
    "weighted_draw",
]
