"""Input normalisation fitted on the training split: Min-Max and Z-score."""

from lightning_techniques.normalization.minmax import MinMaxNormalization, MinMaxScale, min_max_scale
from lightning_techniques.normalization.zscore import Standardize, ZScoreNormalization, merge_moments, standardize

__all__: list[str] = [
    "MinMaxNormalization",
    "MinMaxScale",
    "Standardize",
    "ZScoreNormalization",
    "merge_moments",
    "min_max_scale",
    "standardize",
]
