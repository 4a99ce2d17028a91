"""Input normalisation fitted on the training split: Min-Max and Z-score; batch-normalisation techniques."""

from lightning_techniques.normalization.batchnorm import (
    FreezeBatchNorm,
    NormSwap,
    PreciseBN,
    SyncBatchNormConversion,
    batchnorm_layers,
    convert_sync_batchnorm_,
    group_norm_from_batch_norm,
    precise_bn_stats_,
    revert_sync_batchnorm_,
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
    "SyncBatchNormConversion",
    "ZScoreNormalization",
    "batchnorm_layers",
    "convert_sync_batchnorm_",
    "group_norm_from_batch_norm",
    "merge_moments",
    "min_max_scale",
    "precise_bn_stats_",
    "revert_sync_batchnorm_",
    "standardize",
    "swap_batch_norm_",
]
