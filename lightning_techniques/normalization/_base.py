"""What Min-Max and Z-score normalisation share: the statistics' shape, one streaming pass over the training split
(sharded over DDP ranks), the on-device batch transform for every stage, checkpointing and export.

Area-internal: the public techniques are :class:`~lightning_techniques.normalization.ZScoreNormalization` and
:class:`~lightning_techniques.normalization.MinMaxNormalization`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sized
from typing import Any, Literal, cast

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_techniques._internal import compat
from lightning_techniques._internal.batch import get_inputs, set_inputs
from lightning_techniques._internal.batch_transforms import BatchTransformCallback
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_positive

Per = Literal["feature", "channel", "global"]
PER_CHOICES = ("feature", "channel", "global")


def reduce_dims(ndim: int, per: str) -> tuple[int, ...]:
    """Dimensions of a ``[B, ...]`` input of ``ndim`` dimensions that one statistic is taken over.

    ``"feature"``: over the batch only (one statistic per feature / pixel); ``"channel"``: over every dimension
    but 1 (one per channel of ``[B, C, ...]``); ``"global"``: over everything (one scalar).
    """
    check_choice("per", per, PER_CHOICES)
    if ndim < 1 or (per == "channel" and ndim < 2):
        raise ValueError(f"per={per!r} needs inputs of shape [B, C, ...]; got an input with {ndim} dimension(s).")
    if per == "feature":
        return (0,)
    if per == "channel":
        return (0, *range(2, ndim))
    return tuple(range(ndim))


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Floating-point view of an input (integer images become the default float dtype)."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


class _FittedNormalization(BatchTransformCallback):
    """Base adapter: fit on the training split once (never on resume), apply identically in every stage."""

    _what = "normalisation"
    takes_over: frozenset[str] = frozenset({"batch_transform"})
    # a second normalisation would be fitted on the raw inputs but applied to already normalised ones
    conflicts_with: tuple[str, ...] = ("ZScoreNormalization", "MinMaxNormalization")

    def __init__(
        self,
        per: Per = "feature",
        eps: float = 1e-8,
        input_key: str | int | None = None,
        fit_batch_size: int = 1024,
        stages: list[str] | None = None,
    ) -> None:
        check_choice("per", per, PER_CHOICES)
        check_non_negative("eps", eps)
        check_positive("fit_batch_size", fit_batch_size, integer=True)
        stages = list(stages) if stages is not None else ["train", "validate", "test", "predict"]
        for stage in stages:
            check_choice("stages entry", stage, ["train", "validate", "test", "predict"])
        if "train" not in stages:
            raise ValueError(f"stages={stages} must include 'train' (the model is trained on normalised inputs).")
        self.per = per
        self.eps = eps
        self.input_key = input_key
        self.fit_batch_size = fit_batch_size
        self.stages = stages
        self.stats: dict[str, torch.Tensor] | None = None  # float64, shaped like one input without the batch dim
        self.num_fits = 0  # fits done by this instance (runtime only, not checkpointed)
        self._module: nn.Module | None = None
        self._module_device: torch.device | None = None  # where _module's buffers are

    # ------------------------------------------------------------------ to implement
    def _empty(self) -> dict[str, Any]:
        raise NotImplementedError

    def _accumulate(self, acc: dict[str, Any], x: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish(self, strategy: Any, acc: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _make_module(self, stats: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def _summary(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    @property
    def fitted(self) -> bool:
        return self.stats is not None

    def export_module(self) -> nn.Module:
        """A plain ``nn.Module`` (CPU copy) doing exactly the in-training transform; prepend it for inference:
        ``nn.Sequential(norm.export_module(), model)``."""
        if self.stats is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: run trainer.fit first (or load a checkpoint).")
        return copy.deepcopy(self._get_module()).cpu()

    def fit(self, batches: Any, strategy: Any = None) -> dict[str, torch.Tensor]:
        """Fit the statistics on an iterable of batches (or input tensors); all-reduced over ``strategy``'s ranks."""
        acc = self._empty()
        nan: torch.Tensor | None = None  # per statistic entry: some input of it was NaN / +-Inf
        inf: torch.Tensor | None = None
        for batch in batches:
            x = batch if isinstance(batch, torch.Tensor) else get_inputs(batch, self.input_key)
            x = as_float(x).detach().to("cpu", torch.float64)
            if x.shape[0]:
                dims = reduce_dims(x.ndim, self.per)
                batch_nan, batch_inf = torch.isnan(x).sum(dim=dims) > 0, torch.isinf(x).sum(dim=dims) > 0
                nan = batch_nan if nan is None else nan | batch_nan
                inf = batch_inf if inf is None else inf | batch_inf
            self._accumulate(acc, x)
        if acc.get("count", 0) == 0 and strategy is None:
            raise ValueError(f"{type(self).__name__}: the training data yielded no samples to fit on.")
        self._check_finite(strategy, nan, inf)
        self.stats = self._finish(strategy, acc)
        self._module = None
        self.num_fits += 1
        return self.stats

    def _check_finite(self, strategy: Any, nan: torch.Tensor | None, inf: torch.Tensor | None) -> None:
        """Refuse non-finite training inputs before fitting, naming the technique, the statistics that would be
        NaN/Inf and how many features hold NaN and +/-Inf (agreed over ranks, so every rank raises)."""
        if nan is None or inf is None:
            return
        from lightning_techniques._internal.distributed import all_reduce_max

        nan = all_reduce_max(strategy, nan.to(torch.float64)) > 0
        inf = all_reduce_max(strategy, inf.to(torch.float64)) > 0
        if not bool(nan.any() or inf.any()):
            return
        names = [{"m2": "std"}.get(key, key) for key in self._empty() if key != "count"]
        raise ValueError(
            f"{type(self).__name__}: the training inputs contain non-finite values, so the fitted "
            f"{' / '.join(repr(n) for n in names)} would be NaN/Inf: {int(nan.sum())} of {nan.numel()} features "
            f"(per={self.per!r}) hold NaN and {int(inf.sum())} hold +/-Inf. Clean or impute the training data "
            "(e.g. drop those samples or torch.nan_to_num) before fitting."
        )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            check_conflicts(trainer, self)
        self.install_transform(trainer, pl_module, stages=self.stages)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # after the checkpoint restore (load_state_dict): a resumed run keeps its statistics and never refits
        if self.stats is None:
            self.fit(self._training_batches(trainer), strategy=trainer.strategy)
            rank_zero_info(f"{type(self).__name__}: fitted on the training split ({self._summary()}).")

    def _require_fitted(self, *_: Any) -> None:
        if self.stats is None:
            raise RuntimeError(
                f"{type(self).__name__} has no statistics: fit first (trainer.fit with this callback), or pass the "
                "ckpt_path of a checkpoint written with it."
            )

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._require_fitted()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._require_fitted()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._require_fitted()

    def state_dict(self) -> dict[str, Any]:
        return {"per": self.per, "stats": None if self.stats is None else {k: v.clone() for k, v in self.stats.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stats = state_dict.get("stats")
        if stats is not None and state_dict.get("per", self.per) != self.per:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's statistics were fitted with per={state_dict['per']!r}, "
                f"this callback has per={self.per!r}."
            )
        self.stats = None if stats is None else {k: v.to(torch.float64) for k, v in stats.items()}
        self._module = None

    # ------------------------------------------------------------------ internals
    def _get_module(self) -> nn.Module:
        if self._module is None:
            assert self.stats is not None
            self._module = self._make_module(self.stats)
            self._module_device = next(iter(self._module.buffers())).device
        return self._module

    def _transform(self, batch: Any, stage: str) -> Any:
        self._require_fitted()
        x = get_inputs(batch, self.input_key)
        module = self._module if self._module is not None else self._get_module()
        if self._module_device != x.device:  # (kept beside the module: no walk over its buffers per batch)
            module.to(x.device)
            self._module_device = x.device
        return set_inputs(batch, module.forward(x), self.input_key)  # our own module: no hooks to run

    def _training_batches(self, trainer: Any) -> Iterator[Any]:
        """One pass over the training split: this rank's shard of a map-style dataset, in order, or the train loader
        itself (an iterable dataset / not a DataLoader)."""
        loader = compat.request_train_dataloader(trainer)
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            dataset = loader.dataset
            world, rank = trainer.world_size, trainer.global_rank
            # a map-style dataset (not an IterableDataset): sized, though torch's Dataset does not declare __len__
            shard = Subset(dataset, list(range(rank, len(cast(Sized, dataset)), world))) if world > 1 else dataset
            return iter(DataLoader(shard, batch_size=self.fit_batch_size, shuffle=False, collate_fn=loader.collate_fn))
        if isinstance(loader, (dict, list, tuple)) or compat.is_combined_loader(loader):
            raise TypeError(
                f"{type(self).__name__}: the training data is several loaders ({type(loader).__name__}); it fits on "
                "one train DataLoader. Call fit(batches) on the instance yourself before trainer.fit."
            )
        if isinstance(loader, DataLoader) or hasattr(loader, "__iter__"):
            if trainer.world_size > 1:
                rank_zero_warn(
                    f"{type(self).__name__}: the train loader is not a DataLoader over a map-style dataset; every rank "
                    "fits on what its own loader yields and the statistics are all-reduced."
                )
            return iter(loader)
        raise TypeError(
            f"{type(self).__name__}: cannot iterate the training data ({type(loader).__name__}); use a DataLoader."
        )
