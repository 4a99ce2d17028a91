"""Class imbalance: class-weighted (or focal) loss and weighted oversampling of the training set.

Functional core (plain torch): :func:`class_weights` (inverse frequency, inverse square root, effective number of
samples after Cui et al., CVPR 2019), :class:`FocalLoss` (Lin et al., ICCV 2017), :func:`sample_weights` and
:func:`weighted_draw`. Lightning adapters: :class:`ClassWeightedLoss` (through the shared criterion mechanism) and
:class:`Oversampling` (through the shared sampler-steering mechanism). Both find the labels with
:func:`lightning_techniques.data.labels.find_labels`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torch.utils.data import DataLoader, Dataset

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.criterion import CriterionHandle
from lightning_techniques._internal.distributed import (
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    broadcast_object,
)
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.sampling import SteeringCallback
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_number, check_positive
from lightning_techniques.data.labels import class_counts, find_labels

WeightMode = Literal["inverse", "inverse_sqrt", "effective"]
WEIGHT_MODES: tuple[str, ...] = ("inverse", "inverse_sqrt", "effective")


# ----------------------------------------------------------------------------------------------- functional core
def class_weights(counts: Tensor | Sequence[float], mode: str = "inverse", beta: float = 0.999,
                  normalize: bool = True) -> Tensor:
    """Per-class weights (``float64``) from per-class sample counts ``n_c``.

    * ``"inverse"``: ``1 / n_c``;
    * ``"inverse_sqrt"``: ``1 / sqrt(n_c)``;
    * ``"effective"``: ``(1 - beta) / (1 - beta^n_c)`` - the inverse "effective number of samples" of Cui et al.,
      "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019 (``beta -> 1``: inverse frequency;
      ``beta = 0``: no re-weighting).

    Classes with no sample get weight 0. With ``normalize`` the weights of the present classes sum to their number
    (Cui et al.'s normalisation), so a balanced set gets all-ones weights.
    """
    check_choice("mode", mode, WEIGHT_MODES)
    check_number("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    n = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if (n < 0).any():
        raise ValueError(f"class counts must be >= 0, got {n.tolist()}.")
    present = n > 0
    w = torch.zeros_like(n)
    if mode == "inverse":
        w[present] = 1.0 / n[present]
    elif mode == "inverse_sqrt":
        w[present] = 1.0 / n[present].sqrt()
    else:
        w[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n[present]))
    if normalize and present.any():
        w = w * present.sum() / w.sum()
    return w


def sample_weights(labels: Tensor, weights_per_class: Tensor) -> Tensor:
    """Per-sample weight ``weights_per_class[labels[i]]`` (``float64``)."""
    return torch.as_tensor(weights_per_class, dtype=torch.float64)[labels.long()]


def weighted_draw(weights: Tensor, num_samples: int, replacement: bool, generator: torch.Generator) -> Tensor:
    """``num_samples`` indices drawn with probability proportional to ``weights`` (``torch.multinomial``)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if not replacement and num_samples > int((w > 0).sum()):
        raise ValueError(f"cannot draw num_samples={num_samples} without replacement from {int((w > 0).sum())} "
                         "samples of non-zero weight; use replacement=True or fewer samples.")
    return torch.multinomial(w, num_samples, replacement=replacement, generator=generator)


class FocalLoss(_Loss):
    """Focal loss for multi-class logits: ``-w_y (1 - p_y)^gamma log p_y`` (Lin, Goyal, Girshick, He & Dollar,
    "Focal Loss for Dense Object Detection", ICCV 2017), down-weighting easy, well-classified samples.

    Same interface as ``nn.CrossEntropyLoss`` (``input [B, C]`` logits, ``target [B]`` class indices); ``weight``
    (per-class, the paper's alpha) and ``reduction="mean"`` average like ``CrossEntropyLoss`` (divided by the sum of
    the targets' weights), so ``gamma=0`` gives exactly ``CrossEntropyLoss(weight)``.

    Args:
        gamma: focusing parameter (paper: 2).
        weight: optional per-class weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: target value that contributes nothing.

    Example::

        criterion = FocalLoss(gamma=2.0, weight=class_weights(counts))

    Soft (class-probability) targets ``[B, C]``, as MixUp and CutMix produce, give
    ``-sum_c y_c w_c (1 - p_c)^gamma log p_c`` averaged over the batch, like ``CrossEntropyLoss`` with probability
    targets (``gamma=0`` equals it).
    """

    weight: Tensor | None  # buffer, registered in __init__

    def __init__(self, gamma: float = 2.0, weight: Tensor | None = None, reduction: Literal["mean", "sum", "none"] = "mean",
                 ignore_index: int = -100) -> None:
        check_non_negative("gamma", gamma)
        check_choice("reduction", reduction, ["mean", "sum", "none"])
        super().__init__(reduction=reduction)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32),
                             persistent=False)
        self.gamma = float(gamma)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if target.ndim == 2 and target.is_floating_point():
            return self._soft(input, target)
        if target.ndim != 1 or target.is_floating_point():
            raise ValueError("FocalLoss expects integer class targets [B] or class-probability targets [B, C]; got "
                             f"{'a floating' if target.is_floating_point() else 'an integer'} tensor of shape "
                             f"{tuple(target.shape)}.")
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        logp = F.log_softmax(input.float(), dim=1).gather(1, safe[:, None]).squeeze(1)
        loss = -((1.0 - logp.exp()).clamp_min(0.0) ** self.gamma) * logp
        w = valid.to(loss.dtype)
        if self.weight is not None:
            w = w * self.weight.to(loss.dtype)[safe]
        loss = loss * w
        if self.reduction == "none":
            return loss.to(input.dtype)
        if self.reduction == "sum":
            return loss.sum().to(input.dtype)
        return (loss.sum() / w.sum()).to(input.dtype)

    def _soft(self, input: Tensor, target: Tensor) -> Tensor:
        """Class-probability targets (MixUp / CutMix / label smoothing): ``-sum_c y_c w_c (1 - p_c)^gamma log p_c``,
        averaged over the batch like ``CrossEntropyLoss`` with probability targets (so ``gamma=0`` equals it)."""
        if target.shape != input.shape:
            raise ValueError(f"FocalLoss: soft targets of shape {tuple(target.shape)} do not match the logits' "
                             f"{tuple(input.shape)}.")
        logp = F.log_softmax(input.float(), dim=1)
        per_class = -((1.0 - logp.exp()).clamp_min(0.0) ** self.gamma) * logp * target.float()
        if self.weight is not None:
            per_class = per_class * self.weight.to(per_class.dtype)
        loss = per_class.sum(dim=1)
        if self.reduction == "none":
            return loss.to(input.dtype)
        if self.reduction == "sum":
            return loss.sum().to(input.dtype)
        return loss.mean().to(input.dtype)


def _train_dataset(trainer: Any, owner: str) -> Dataset:
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    if isinstance(loader, dict) and len(loader) == 1:
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{owner} needs a single torch DataLoader as train dataloader; got {type(loader).__name__}.")
    return loader.dataset


def _check_same_dataset(strategy: Any, n: int, owner: str) -> None:
    size = torch.tensor([float(n)], dtype=torch.float64)
    if not torch.equal(all_reduce_max(strategy, size), all_reduce_min(strategy, size)):
        raise ValueError(f"{owner}: the ranks hold training sets of different sizes; when every rank holds its own "
                         "shard of the data, pass dataset_is_sharded=True.")


def global_class_counts(strategy: Any, dataset: Dataset, world_size: int, rank: int, num_classes: int | None,
                        dataset_is_sharded: bool, owner: str, target_key: str | int | None = None) -> Tensor:
    """Class counts of the whole training set under DDP (see :class:`ClassWeightedLoss` for what is reduced).

    Unless ``dataset_is_sharded``, every rank holds the same dataset and reads the labels of a disjoint share of it
    (``rank::world_size``; an item-by-item pass reads only that share), and the counts are summed over ranks.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if dataset_is_sharded:
        local = find_labels(dataset, target_key)
    else:
        _check_same_dataset(strategy, n, owner)
        local = find_labels(dataset, target_key, indices=range(rank, n, world_size))
    local_size = torch.tensor([float(local.max()) + 1 if len(local) else 0.0], dtype=torch.float64)
    size = int(all_reduce_max(strategy, local_size).item())
    if num_classes is not None:
        if size > num_classes:
            raise ValueError(f"{owner}: the labels go up to {size - 1} but num_classes={num_classes}.")
        size = num_classes
    return all_reduce_sum(strategy, class_counts(local, size))


# ----------------------------------------------------------------------------------------------- Lightning adapters
class ClassWeightedLoss(LeanHooks, Callback):
    """Class-weighted loss for imbalanced data: computes class weights from the training labels and applies them
    to the module's criterion (``weight=`` of ``nn.CrossEntropyLoss`` / ``nn.NLLLoss``), or swaps in a weighted
    :class:`FocalLoss` (``focal_gamma``).

    Weights (see :func:`class_weights`): inverse frequency, inverse square root, or the inverse effective number of
    samples (Cui, Jia, Lin, Song & Belongie, CVPR 2019); focal loss after Lin et al., ICCV 2017.

    Labels are found without reading the inputs when the training set has a ``targets``/``labels`` attribute
    (or is a ``Subset``/``ConcatDataset``/``TensorDataset`` of such), else by one pass over its items. Under DDP
    the class counts are all-reduced: in the usual case every rank holds the same training set (Lightning shards
    it through the sampler), so each rank counts a disjoint share of it (``labels[rank::world_size]``) and the sum
    is the count of the training set, exactly once (the ranks' set sizes are checked to agree). With
    ``dataset_is_sharded=True`` (each rank holds its own part) each rank counts all of its labels and the counts
    are summed. The weights are computed at ``on_train_start`` (same on every rank), applied through the shared
    ``CriterionHandle`` (non-persistent buffers: the module's ``state_dict`` is unchanged) and undone at teardown.
    A module that holds no loss-module attribute (its ``training_step`` calls ``F.cross_entropy`` itself) is refused
    in ``setup``: the weights could not reach its loss. Either hold the loss as ``self.criterion =
    nn.CrossEntropyLoss()``, or opt in with ``expose_only=True``: the weights are then only exposed as a
    non-persistent buffer ``module.<expose_attr>`` for the module's own loss code (``F.cross_entropy(...,
    weight=self.class_weights)``). ``self.class_weights`` and ``self.counts`` keep the values (also in the callback's
    checkpoint state).

    Args:
        mode: ``"inverse"``, ``"inverse_sqrt"`` or ``"effective"``.
        beta: ``beta`` of ``"effective"`` (paper: 0.9 ... 0.9999).
        focal_gamma: use a :class:`FocalLoss` with this gamma (the class weights as its alpha); None: keep the
            module's criterion and set its ``weight``.
        normalize: scale the weights of the present classes to sum to their number.
        num_classes: number of classes (default: largest label + 1).
        criterion_attr: name of the module's criterion attribute (default: the single loss-module attribute).
        expose_only: do not touch any criterion; only expose the weights as ``module.<expose_attr>`` (for a module
            whose own loss code reads them).
        expose_attr: buffer name used with ``expose_only``.
        target_key: where the target is in an item, if the labels must be read item by item.
        dataset_is_sharded: each DDP rank holds a different part of the data (see above).

    Example::

        trainer = L.Trainer(callbacks=[ClassWeightedLoss(mode="effective", beta=0.999)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(keep_fraction={0: 0.05, 1: 0.05}))

    Limits: integer class targets; the focal option replaces only ``nn.CrossEntropyLoss`` criteria; weights come
    from the train loader's dataset as it is at the start of fit (a dataset that changes later is not re-counted).
    """

    takes_over: frozenset[str] = frozenset({"criterion"})
    conflicts_with: tuple[str, ...] = ("ClassWeightedLoss",)  # two would set the same criterion's weight

    def __init__(
        self,
        mode: WeightMode = "inverse",
        beta: float = 0.999,
        focal_gamma: float | None = None,
        normalize: bool = True,
        num_classes: int | None = None,
        criterion_attr: str | None = None,
        expose_attr: str = "class_weights",
        target_key: str | int | None = None,
        dataset_is_sharded: bool = False,
        expose_only: bool = False,
    ) -> None:
        check_choice("mode", mode, WEIGHT_MODES)
        check_number("beta", beta, low=0.0, high=1.0, high_inclusive=False)
        if focal_gamma is not None:
            check_non_negative("focal_gamma", focal_gamma)
        if num_classes is not None:
            check_number("num_classes", num_classes, low=2, integer=True)
        if not isinstance(expose_attr, str) or not expose_attr.isidentifier():
            raise ValueError(f"expose_attr must be a Python identifier, got {expose_attr!r}.")
        if not isinstance(expose_only, bool):
            raise TypeError(f"expose_only must be a bool, got {expose_only!r}.")
        if expose_only and (focal_gamma is not None or criterion_attr is not None):
            raise ValueError("expose_only=True only exposes the weights as module.<expose_attr>; it cannot be combined "
                             "with focal_gamma or criterion_attr, which change the module's criterion.")
        self.mode = mode
        self.beta = beta
        self.focal_gamma = focal_gamma
        self.normalize = normalize
        self.num_classes = num_classes
        self.criterion_attr = criterion_attr
        self.expose_attr = expose_attr
        self.target_key = target_key
        self.dataset_is_sharded = dataset_is_sharded
        self.expose_only = expose_only
        self.class_weights: Tensor | None = None
        self.counts: Tensor | None = None
        self._handle: CriterionHandle | None = None
        self._exposed_on: nn.Module | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        handle: CriterionHandle | None = None
        if self.expose_only:
            if hasattr(pl_module, self.expose_attr):
                raise ValueError(
                    f"ClassWeightedLoss(expose_only=True): {type(pl_module).__name__} already has an attribute "
                    f"{self.expose_attr!r}; pass expose_attr=... with a free name."
                )
        else:
            try:
                handle = CriterionHandle(pl_module, self.criterion_attr)
            except AttributeError as err:
                if self.criterion_attr is not None:
                    raise
                raise ValueError(
                    f"ClassWeightedLoss cannot reach the loss of {type(pl_module).__name__}: {err} A loss computed "
                    "with a function (F.cross_entropy) inside training_step is not seen, so the class weights would "
                    "silently do nothing. Fix: hold the loss as an attribute (`self.criterion = "
                    "nn.CrossEntropyLoss()` in __init__, `self.criterion(logits, y)` in training_step), or pass "
                    "expose_only=True and use the weights yourself: F.cross_entropy(logits, y, "
                    f"weight=self.{self.expose_attr})."
                ) from None
        if handle is not None:
            if self.focal_gamma is not None and not isinstance(handle.criterion, nn.CrossEntropyLoss):
                raise TypeError(f"ClassWeightedLoss(focal_gamma=...) replaces an nn.CrossEntropyLoss criterion; "
                                f"module.{handle.name} is a {type(handle.criterion).__name__}.")
            if self.focal_gamma is None and "weight" not in handle.options():
                raise TypeError(f"ClassWeightedLoss: module.{handle.name} ({type(handle.criterion).__name__}) has no "
                                f"`weight` option (it has {handle.options()}); use a criterion with class weights "
                                "such as nn.CrossEntropyLoss, or focal_gamma=....")
        self._handle = handle

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        dataset = _train_dataset(trainer, "ClassWeightedLoss")
        counts = global_class_counts(trainer.strategy, dataset, trainer.world_size, trainer.global_rank,
                                     self.num_classes, self.dataset_is_sharded, "ClassWeightedLoss", self.target_key)
        self.counts = counts
        self.class_weights = class_weights(counts, self.mode, self.beta, self.normalize)
        weights = self.class_weights.to(torch.float32)
        handle = self._handle
        if handle is None:
            ref = next(iter(pl_module.parameters()), None)
            pl_module.register_buffer(self.expose_attr, weights.to(ref.device) if ref is not None else weights,
                                      persistent=False)
            self._exposed_on = pl_module
        elif self.focal_gamma is not None:
            old = handle.criterion
            handle.replace(FocalLoss(self.focal_gamma, weight=weights, ignore_index=getattr(old, "ignore_index", -100),
                                     reduction=getattr(old, "reduction", "mean")))
        else:
            handle.set(weight=weights)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._handle is not None:
            self._handle.restore()
            self._handle = None
        if self._exposed_on is not None:
            if self.expose_attr in self._exposed_on._buffers:
                del self._exposed_on._buffers[self.expose_attr]
                self._exposed_on._non_persistent_buffers_set.discard(self.expose_attr)
            self._exposed_on = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # the user's module never keeps the run's criterion changes

    def state_dict(self) -> dict[str, Any]:
        return {"class_weights": self.class_weights, "counts": self.counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.class_weights = state_dict.get("class_weights")
        self.counts = state_dict.get("counts")


class Oversampling(SteeringCallback):
    """Weighted oversampling of the training set: every epoch the train loader draws ``num_samples`` indices with
    probability proportional to a per-sample weight that rebalances the classes (or to user weights).

    The classical random oversampling of minority classes (e.g. Buda, Maki & Mazurowski, "A systematic study of the
    class imbalance problem in convolutional neural networks", Neural Networks 2018), as PyTorch's
    ``WeightedRandomSampler`` does, but correct under DDP and resumable. With ``mode="inverse"`` every class is
    drawn equally often in expectation; ``"inverse_sqrt"`` and ``"effective"`` (Cui et al. 2019) rebalance
    partially. Per-sample ``sample_weights`` replace the class-based weights.

    Each epoch's draw is one global ``torch.multinomial`` seeded by ``seed + epoch`` (the same on every rank),
    steered through the shared ``SamplerSteering`` mechanism: under DDP each rank takes a disjoint share of the
    positions of that one draw, so no sample is duplicated across ranks beyond what the weighting itself draws,
    and a checkpoint taken mid-epoch resumes the same draw at the same position. Without replacement, each sample
    appears at most once per epoch (a weighted ordering; with ``num_samples`` < the set size, minority samples are
    favoured). Labels are found as for :class:`ClassWeightedLoss` (read on rank 0, weights broadcast).

    Args:
        mode: ``"inverse"`` (balanced), ``"inverse_sqrt"`` or ``"effective"``.
        beta: ``beta`` of ``"effective"``.
        sample_weights: optional per-sample weights (one per training sample) instead of class-based ones.
        replacement: draw with replacement (default, oversampling) or without.
        num_samples: draws per epoch (default: the training set size).
        target_key: where the target is in an item, if the labels must be read item by item.
        seed: seed of the draws (the draw of an epoch depends only on it, the epoch and the weights).

    Example::

        trainer = L.Trainer(callbacks=[Oversampling(mode="inverse")])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(keep_fraction={0: 0.05}))

    Limits: one technique per run may steer the train sampler (not together with :class:`CurriculumLearning`);
    needs a map-style dataset in a single ``DataLoader`` built with ``batch_size``.
    """

    takes_over: frozenset[str] = frozenset({"train_sampler"})
    conflicts_with: tuple[str, ...] = ("CurriculumLearning",)  # one sampler steerer per run (also: "train_sampler" is exclusive)

    def __init__(
        self,
        mode: WeightMode = "inverse",
        beta: float = 0.999,
        sample_weights: Sequence[float] | Tensor | None = None,
        replacement: bool = True,
        num_samples: int | None = None,
        target_key: str | int | None = None,
        seed: int = 0,
    ) -> None:
        check_choice("mode", mode, WEIGHT_MODES)
        check_number("beta", beta, low=0.0, high=1.0, high_inclusive=False)
        if sample_weights is not None:
            try:
                w = torch.as_tensor(sample_weights, dtype=torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"sample_weights must be a 1-D sequence of numbers ({err}).") from None
            if len(w) == 0 or not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
                raise ValueError("sample_weights must be finite, >= 0, with at least one > 0.")
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement must be a bool, got {replacement!r}.")
        if num_samples is not None:
            check_positive("num_samples", num_samples, integer=True)
        check_number("seed", seed, integer=True)
        self.mode = mode
        self.beta = beta
        self.sample_weights = sample_weights
        self.replacement = replacement
        self.num_samples = num_samples
        self.target_key = target_key
        self.seed = seed
        self.weights: Tensor | None = None  # the per-sample weights in use
        self._trainer: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._trainer = trainer
        super().setup(trainer, pl_module, stage)  # conflicts refused, the sampler steered

    def _compute_weights(self, dataset: Dataset) -> Tensor:
        n = len(dataset)  # type: ignore[arg-type]
        if self.sample_weights is not None:
            w = torch.as_tensor(self.sample_weights, dtype=torch.float64).reshape(-1)
            if len(w) != n:
                raise ValueError(f"Oversampling: sample_weights has {len(w)} entries but the training set has {n} "
                                 "samples.")
            return w
        labels = find_labels(dataset, self.target_key)
        return sample_weights(labels, class_weights(class_counts(labels), self.mode, self.beta))

    def _plan_factory(self, dataset: Dataset, loader: DataLoader) -> tuple[Callable[[int], Sequence[int]], int]:
        trainer = self._trainer
        weights = self._compute_weights(dataset) if trainer.is_global_zero else None
        self.weights = broadcast_object(trainer.strategy, weights)
        assert self.weights is not None  # rank 0 computed them; the broadcast delivered them to every rank
        size = self.num_samples or len(dataset)  # type: ignore[arg-type]
        if not self.replacement and size > int((self.weights > 0).sum()):
            raise ValueError(f"Oversampling: num_samples={size} without replacement exceeds the "
                             f"{int((self.weights > 0).sum())} samples of non-zero weight.")

        def plan(epoch: int) -> Sequence[int]:
            generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
            assert self.weights is not None
            return weighted_draw(self.weights, size, self.replacement, generator).tolist()

        return plan, size

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_sampler_state(state_dict.get("sampler"))
