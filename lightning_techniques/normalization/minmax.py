"""Min-Max normalisation fitted on the training split: ``(x - min) / (max - min)`` mapped to a feature range."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_techniques._internal.distributed import all_reduce_max, all_reduce_min, all_reduce_sum
from lightning_techniques._internal.validation import check_number
from lightning_techniques.normalization._base import _FittedNormalization, reduce_dims
from lightning_techniques.normalization.zscore import cached_cast, check_batch_shape

# ---------------------------------------------------------------------------------------------------------------- core


def batch_min_max(x: torch.Tensor, per: str = "feature") -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(min, max)`` of one batch in float64 over the dimensions ``per`` reduces (batch dim dropped)."""
    dims = reduce_dims(x.ndim, per)
    x = x.to(torch.float64)
    return x.amin(dim=dims, keepdim=True).squeeze(0), x.amax(dim=dims, keepdim=True).squeeze(0)


def min_max_scale_params(
    data_min: torch.Tensor, data_max: torch.Tensor, feature_range: Sequence[float] = (0.0, 1.0), eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` such that ``x * scale + offset`` maps ``[data_min, data_max]`` onto ``feature_range``
    (scikit-learn's ``MinMaxScaler`` parametrisation); a range ``<= eps`` counts as 1 (constant feature)."""
    low, high = float(feature_range[0]), float(feature_range[1])
    data_range = data_max - data_min
    data_range = torch.where(data_range <= eps, torch.ones_like(data_range), data_range)
    scale = (high - low) / data_range
    return scale, low - data_min * scale


def min_max_scale(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``x * scale + offset`` in ``x``'s dtype (statistics broadcast over the batch dimension)."""
    return x * scale.to(x.dtype) + offset.to(x.dtype)


class MinMaxScale(nn.Module):
    """``x * scale + offset`` with fixed parameters (buffers, float64): the exported form of
    :class:`MinMaxNormalization`; build it from data bounds with :meth:`from_bounds`.

    Args:
        scale: per-feature scale, shaped like one input without its batch dimension (or broadcastable to it).
        offset: per-feature offset, same shape.

    Example::

        model = nn.Sequential(MinMaxScale.from_bounds(train_x.amin(0), train_x.amax(0)), net)

    Limits: the input must match the parameters' shape (up to size-1 dimensions); computed in the input's dtype.
    """

    scale: torch.Tensor  # buffers, registered in __init__
    offset: torch.Tensor

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        scale, offset = torch.as_tensor(scale, dtype=torch.float64), torch.as_tensor(offset, dtype=torch.float64)
        if scale.shape != offset.shape:
            raise ValueError(f"scale {tuple(scale.shape)} and offset {tuple(offset.shape)} must have the same shape.")
        self.register_buffer("scale", scale.clone())
        self.register_buffer("offset", offset.clone())

    @classmethod
    def from_bounds(cls, data_min: torch.Tensor, data_max: torch.Tensor, feature_range: Sequence[float] = (0.0, 1.0),
                    eps: float = 1e-8) -> MinMaxScale:
        return cls(*min_max_scale_params(torch.as_tensor(data_min, dtype=torch.float64),
                                         torch.as_tensor(data_max, dtype=torch.float64), feature_range, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        check_batch_shape(self, x, self._buffers["scale"], "MinMaxScale")  # type: ignore[arg-type]
        scale, offset = cached_cast(self, ("scale", "offset"), x.dtype, x.device)  # not re-cast for every batch
        return torch.addcmul(offset, x, scale)  # x * scale + offset in one op

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scale.shape)}"


# ------------------------------------------------------------------------------------------------------------ adapter


class MinMaxNormalization(_FittedNormalization):
    """Rescale the model's inputs so that the training split spans ``feature_range`` (default ``[0, 1]``).

    Min-Max feature scaling (scikit-learn's ``MinMaxScaler``; see e.g. Han, Kamber & Pei, "Data Mining: Concepts
    and Techniques", 2011, sec. 3.5.2). At the start of ``fit`` the callback makes ONE pass over the training split
    and keeps the element-wise minimum and maximum in float64; under DDP each rank takes its share of the samples
    and the bounds are all-reduced (min / max). The transform is applied to the batch on the device in training
    **and** validation / test / predict with the train bounds (so validation values may fall outside the range).
    The bounds are part of the checkpoint: a resumed run never refits. :meth:`export_module` returns a
    :class:`MinMaxScale` module to prepend to the model for inference.

    Args:
        feature_range: ``[low, high]`` the training data is mapped onto (``low < high``).
        per: ``"feature"`` (one range per input element), ``"channel"`` (per channel of ``[B, C, ...]``) or
            ``"global"`` (one scalar range).
        eps: ranges ``<= eps`` (constant features) count as 1: such a feature maps to ``low`` on the training data.
        input_key: where the input is in a dict/tuple batch (default: element 0 or a known key such as ``"x"``).
        fit_batch_size: batch size of the fitting pass.
        stages: stages the transform is applied in (default all four; ``"train"`` is required).

    Example::

        norm = MinMaxNormalization(feature_range=[-1.0, 1.0])
        trainer = L.Trainer(callbacks=[norm], max_epochs=10)
        trainer.fit(TabularMLP(), datamodule=BreastCancerDataModule())
        deployable = nn.Sequential(norm.export_module(), trainer.lightning_module)

    Limits: sensitive to outliers (one extreme training value compresses a whole feature); statistics are of the
    dataset's inputs as the train DataLoader returns them (before the user's ``on_after_batch_transfer``). A second
    ``fit`` with the same instance keeps the first bounds.
    """

    _what = "Min-Max"

    def __init__(
        self,
        feature_range: list[float] | tuple[float, float] = (0.0, 1.0),
        per: Literal["feature", "channel", "global"] = "feature",
        eps: float = 1e-8,
        input_key: str | int | None = None,
        fit_batch_size: int = 1024,
        stages: list[str] | None = None,
    ) -> None:
        if not isinstance(feature_range, (list, tuple)) or len(feature_range) != 2:
            raise ValueError(f"feature_range must be a pair [low, high], got {feature_range!r}.")
        low = check_number("feature_range[0]", feature_range[0])
        high = check_number("feature_range[1]", feature_range[1])
        if not low < high:
            raise ValueError(f"feature_range must have low < high, got {list(feature_range)}.")
        super().__init__(per=per, eps=eps, input_key=input_key, fit_batch_size=fit_batch_size, stages=stages)
        self.feature_range = [float(low), float(high)]

    @property
    def data_min(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats["min"]

    @property
    def data_max(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats["max"]

    def _empty(self) -> dict[str, Any]:
        return {"count": 0, "min": None, "max": None}

    def _accumulate(self, acc: dict[str, Any], x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        lo, hi = batch_min_max(x, self.per)
        acc["min"] = lo if acc["min"] is None else torch.minimum(acc["min"], lo)
        acc["max"] = hi if acc["max"] is None else torch.maximum(acc["max"], hi)
        acc["count"] += x.shape[0]

    def _finish(self, strategy: Any, acc: dict[str, Any]) -> dict[str, torch.Tensor]:
        if acc["min"] is None:  # only possible with fewer training samples than ranks
            raise ValueError(f"{type(self).__name__}: this rank's share of the training data is empty.")
        data_min = all_reduce_min(strategy, acc["min"])
        data_max = all_reduce_max(strategy, acc["max"])
        count = all_reduce_sum(strategy, torch.tensor(float(acc["count"]), dtype=torch.float64))
        constant = int(((data_max - data_min) <= self.eps).sum())
        if constant:
            rank_zero_warn(f"MinMaxNormalization: {constant} constant feature(s) (range <= eps={self.eps}) map to "
                           f"{self.feature_range[0]}.")
        return {"min": data_min, "max": data_max, "count": count}

    def _make_module(self, stats: dict[str, torch.Tensor]) -> nn.Module:
        return MinMaxScale.from_bounds(stats["min"], stats["max"], self.feature_range, self.eps)

    def _summary(self) -> str:
        assert self.stats is not None
        return f"per={self.per}, bounds shape {tuple(self.stats['min'].shape)}, {int(self.stats['count'])} samples"
