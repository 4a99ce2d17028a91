"""Z-score standardisation fitted on the training split: ``(x - mean) / std`` per feature, channel or globally."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_techniques._internal.distributed import all_reduce_sum
from lightning_techniques.normalization._base import _FittedNormalization, reduce_dims

# ---------------------------------------------------------------------------------------------------------------- core


def batch_moments(x: torch.Tensor, per: str = "feature") -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, M2)`` of one batch in float64, where ``M2 = sum((x - mean)^2)`` over the reduced dimensions;
    ``mean`` and ``M2`` keep the reduced dimensions (size 1) except the batch dimension."""
    dims = reduce_dims(x.ndim, per)
    x = x.to(torch.float64)
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x.mean(dim=dims, keepdim=True)
    m2 = (x - mean).square().sum(dim=dims, keepdim=True)
    return count, mean.squeeze(0), m2.squeeze(0)


def merge_moments(
    a: tuple[float, torch.Tensor, torch.Tensor], b: tuple[float, torch.Tensor, torch.Tensor]
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Chan, Golub & LeVeque's (1979) pairwise combination of two ``(count, mean, M2)`` summaries (the parallel
    form of Welford's 1962 update): exact and numerically stable, no sum of squares is ever formed."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if n_a == 0:
        return b
    if n_b == 0:
        return a
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b / n)
    return n, mean, m2


def safe_std(m2: torch.Tensor, count: float, eps: float = 1e-8) -> torch.Tensor:
    """Population standard deviation ``sqrt(M2 / count)`` with every value ``<= eps`` replaced by 1 (a constant
    feature is then only centred, never divided by ~0)."""
    std = (m2 / count).clamp_min(0).sqrt()
    return torch.where(std <= eps, torch.ones_like(std), std)


def cached_cast(module: nn.Module, names: tuple[str, ...], dtype: torch.dtype, device: torch.device,
                derive: Callable[..., tuple[torch.Tensor, ...]] | None = None) -> tuple[torch.Tensor, ...]:
    """``module``'s buffers ``names`` (or ``derive(*buffers)``, computed in the buffers' own precision) cast to
    ``dtype`` on ``device``, computed once and reused for every batch until a buffer changes: replaced
    (``module.to(...)``, assignment) or modified in place (``load_state_dict`` copies into it; tracked by the
    tensor's version counter). Inference tensors (no version counter) are cast every time. The reuse check reads
    the buffers from ``module._buffers`` and compares identities and versions: a few hundred nanoseconds a batch."""
    buffers = module._buffers
    sources: tuple[torch.Tensor, ...] = tuple([buffers[n] if n in buffers else getattr(module, n)  # type: ignore[misc]
                                               for n in names])
    setting = (dtype, device, torch.is_inference_mode_enabled(), derive)
    cache = module.__dict__.get("_cast_cache")
    # the cache holds the source tensors themselves: identity, not a reusable id(), tells a replaced buffer (and a
    # cached source is never an inference tensor, whose version counter cannot be read)
    if (cache is not None and cache[0] == setting and len(cache[1]) == len(sources)
            and all(map(operator.is_, cache[1], sources)) and cache[2] == tuple([t._version for t in sources])):
        return cache[3]
    values = derive(*sources) if derive is not None else sources
    cast = tuple(t.to(device=device, dtype=dtype) for t in values)
    if not any(t.is_inference() for t in sources):
        module.__dict__["_cast_cache"] = (setting, sources, tuple(t._version for t in sources), cast)
    return cast


def check_batch_shape(module: nn.Module, x: torch.Tensor, stat: torch.Tensor, name: str) -> None:
    """A clear error unless ``x`` is a batch of the statistics' shape (up to size-1 dimensions); a shape pair that
    passed is remembered on ``module`` (not checked again every batch)."""
    key = (x.shape, stat.shape)
    if module.__dict__.get("_checked_shapes") == key:
        return
    if x.ndim != stat.ndim + 1 or any(s != 1 and s != d for s, d in zip(stat.shape, x.shape[1:])):
        raise ValueError(
            f"{name}: input of shape {tuple(x.shape)} does not match the fitted statistics of shape "
            f"{tuple(stat.shape)} (expected [B, {', '.join(map(str, stat.shape))}] up to size-1 dimensions)."
        )
    module.__dict__["_checked_shapes"] = key


def _scale_and_shift(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 / std, -mean / std)``: ``(x - mean) / std == x * scale + shift``, one fused ``addcmul`` per batch."""
    scale = std.reciprocal()
    return scale, -mean * scale


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` computed in ``x``'s dtype (statistics broadcast over the batch dimension)."""
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed statistics (buffers, float64): the exported form of
    :class:`ZScoreNormalization`, to prepend to a model for inference (``nn.Sequential(Standardize(...), model)``).

    Args:
        mean: per-feature means, shaped like one input without its batch dimension (or broadcastable to it).
        std: standard deviations, same shape (must be > 0).

    Example::

        model = nn.Sequential(Standardize(train_x.mean(0), train_x.std(0)), net)

    Limits: the input must match the statistics' shape (up to size-1 dimensions); computed in the input's dtype.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must have the same shape.")
        if not bool((std > 0).all()):
            raise ValueError("std must be > 0 everywhere.")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        check_batch_shape(self, x, self._buffers["mean"], "Standardize")  # type: ignore[arg-type]
        # scale and shift computed in float64 and cast once, not for every batch
        scale, shift = cached_cast(self, ("mean", "std"), x.dtype, x.device, _scale_and_shift)
        return torch.addcmul(shift, x, scale)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mean.shape)}"


# ------------------------------------------------------------------------------------------------------------ adapter


class ZScoreNormalization(_FittedNormalization):
    """Standardise the model's inputs to zero mean and unit variance with statistics of the training split only.

    Z-score standardisation (as scikit-learn's ``StandardScaler``; LeCun, Bottou, Orr & Mueller, "Efficient
    BackProp", 1998, sec. 4.3: inputs with zero mean and equal variance speed up gradient descent). At the start of
    ``fit`` the callback makes ONE pass over the training split and accumulates count / mean / M2 in float64 with
    Chan et al.'s pairwise Welford update; under DDP each rank takes its share of the samples and the summaries are
    all-reduced exactly. The transform ``(x - mean) / std`` is then applied to the batch on the device in training
    **and** validation / test / predict (the same train statistics everywhere). The statistics are part of the
    checkpoint: a resumed run never refits. :meth:`export_module` returns a :class:`Standardize` module to prepend to
    the model for inference.

    Args:
        per: ``"feature"`` (one mean/std per input element, e.g. per tabular column or pixel), ``"channel"`` (per
            channel of ``[B, C, ...]`` images) or ``"global"`` (one scalar).
        eps: standard deviations ``<= eps`` (constant features) are replaced by 1: the feature is only centred.
        input_key: where the input is in a dict/tuple batch (default: element 0 or a known key such as ``"x"``).
        fit_batch_size: batch size of the fitting pass.
        stages: stages the transform is applied in (default all four; ``"train"`` is required).

    Example::

        norm = ZScoreNormalization()
        trainer = L.Trainer(callbacks=[norm], max_epochs=10)
        trainer.fit(TabularMLP(), datamodule=BreastCancerDataModule())
        deployable = nn.Sequential(norm.export_module(), trainer.lightning_module)

    Limits: the statistics are of the dataset's inputs as the train DataLoader's dataset/collate_fn return them
    (before the user's ``on_after_batch_transfer``); put it before augmentation/noise callbacks in ``callbacks`` so
    those see normalised inputs (or after, with ``ImageAugmentation``, whose colour jitter expects ``[0, 1]``
    images). A second ``fit`` with the same instance keeps the first statistics.
    """

    _what = "Z-score"

    def __init__(
        self,
        per: Literal["feature", "channel", "global"] = "feature",
        eps: float = 1e-8,
        input_key: str | int | None = None,
        fit_batch_size: int = 1024,
        stages: list[str] | None = None,
    ) -> None:
        super().__init__(per=per, eps=eps, input_key=input_key, fit_batch_size=fit_batch_size, stages=stages)

    @property
    def mean(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats["mean"]

    @property
    def std(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats["std"]

    def _empty(self) -> dict[str, Any]:
        return {"count": 0, "mean": None, "m2": None}

    def _accumulate(self, acc: dict[str, Any], x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        n, mean, m2 = merge_moments((acc["count"], acc["mean"], acc["m2"]), batch_moments(x, self.per))
        acc.update(count=n, mean=mean, m2=m2)

    def _finish(self, strategy: Any, acc: dict[str, Any]) -> dict[str, torch.Tensor]:
        count, mean, m2 = acc["count"], acc["mean"], acc["m2"]
        if mean is None:  # only possible with fewer training samples than ranks
            raise ValueError(f"{type(self).__name__}: this rank's share of the training data is empty.")
        # exact combination over ranks: global mean from sum(n_i * mean_i), then M2 = sum(M2_i + n_i (mean_i - mean)^2)
        n_local = torch.tensor(float(count), dtype=torch.float64)
        n_total = all_reduce_sum(strategy, n_local)
        global_mean = all_reduce_sum(strategy, mean * n_local) / n_total
        m2_total = all_reduce_sum(strategy, m2 + n_local * (mean - global_mean).square())
        std = safe_std(m2_total, float(n_total), self.eps)
        constant = int(((m2_total / n_total).sqrt() <= self.eps).sum())
        if constant:
            rank_zero_warn(f"ZScoreNormalization: {constant} constant feature(s) (std <= eps={self.eps}) are only "
                           "centred, not scaled.")
        return {"mean": global_mean, "std": std, "count": n_total}

    def _make_module(self, stats: dict[str, torch.Tensor]) -> nn.Module:
        return Standardize(stats["mean"], stats["std"])

    def _summary(self) -> str:
        assert self.stats is not None
        return f"per={self.per}, statistics shape {tuple(self.stats['mean'].shape)}, {int(self.stats['count'])} values each"
