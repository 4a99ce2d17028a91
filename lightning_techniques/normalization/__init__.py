"""Input normalisation fitted on the training split: Min-Max and Z-score; batch-normalisation techniques."""

from lightning_techniques.normalization.batchnorm import (
    FreezeBatchNorm,
    NormSwap,
    PreciseBN,
    batchnorm_layers,
    group_norm_from_batch_norm,
    precise_bn_stats_,
    swap_batch_norm_,
)
from lightning_techniques.normalization.minmax import MinMaxNormalization, MinMaxScale, min_max_scale
from lightning_techniques.normalization.zscore import Standardize, ZScoreNormalization, merge_moments, standardize

__all__: list[str] = [
    "FreezeBatchNorm",
    "MinMaxNormalization",
    "MinMaxScale",
    "NormSwap",
    "PreciseBN",
    "Standardize",
    "ZScoreNormalization",
    "batchnorm_layers",
    "group_norm_from_batch_norm",
    "merge_moments",
    "min_max_scale",
    "precise_bn_stats_",
    "standardize",
    "swap_batch_norm_",
]
