"""Label smoothing through the shared criterion mechanism (Szegedy et al. 2016).

Functional core :func:`smooth_targets`; adapter :class:`LabelSmoothing`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.criterion import CriterionHandle
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.patching import MethodPatch
from lightning_techniques._internal.validation import check_number


def smooth_targets(targets: torch.Tensor, num_classes: int, epsilon: float,
                   ignore_index: int | None = None) -> torch.Tensor:
    """Smoothed class-probability targets ``(1 - epsilon) * y + epsilon / K`` as ``[B, K]`` floats.

    ``targets``: class indices ``[B]`` (one-hot first) or class probabilities ``[B, K]``. With ``ignore_index``,
    rows of ignored hard targets are all zero (they contribute nothing to a soft-target loss). This is the target
    ``nn.CrossEntropyLoss(label_smoothing=epsilon)`` trains against.
    """
    check_number("epsilon", epsilon, low=0.0, high=1.0)
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            raise ValueError(f"soft targets must have shape [B, {num_classes}], got {tuple(targets.shape)}.")
        return targets * (1.0 - epsilon) + epsilon / num_classes
    if targets.ndim != 1:
        raise ValueError(f"class-index targets must have shape [B], got {tuple(targets.shape)}.")
    valid = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None else targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    soft = F.one_hot(safe, num_classes).float() * (1.0 - epsilon) + epsilon / num_classes
    return soft * valid[:, None].to(soft.dtype)


def _soft_target_losses() -> tuple[type[nn.Module], ...]:
    """Criteria that take class-probability targets but have no ``label_smoothing`` option of their own."""
    from lightning_techniques.augment.mixing import SoftTargetNLLLoss
    from lightning_techniques.data.imbalance import FocalLoss

    return (FocalLoss, SoftTargetNLLLoss)


class LabelSmoothing(LeanHooks, Callback):
    """Trains against smoothed targets ``(1 - epsilon) * one_hot(y) + epsilon / K`` by reconfiguring the module's
    criterion for the training batches of ``fit``.

    Szegedy, Vanhoucke, Ioffe, Shlens & Wojna, "Rethinking the Inception Architecture for Computer Vision", CVPR
    2016 (see also Müller, Kornblith & Hinton, "When Does Label Smoothing Help?", NeurIPS 2019). Through the shared
    criterion mechanism: an ``nn.CrossEntropyLoss`` criterion gets ``label_smoothing=epsilon`` (so the loss is
    exactly ``nn.CrossEntropyLoss(weight, label_smoothing=epsilon)``, class weights set by
    :class:`ClassWeightedLoss` included); a criterion that takes class-probability targets but has no such option
    (the :class:`FocalLoss` of ``ClassWeightedLoss(focal_gamma=...)``, ``SoftTargetNLLLoss``) gets its targets
    smoothed by :func:`smooth_targets` on the way in. The change is made on the first training batch (after every
    ``on_train_start``, so a criterion another technique swapped in is the one smoothed), taken back for validation
    (validation loss stays the plain loss, comparable with runs without smoothing), re-applied on the next training
    batch, and undone at teardown or on an exception. Soft targets (MixUp / CutMix) are smoothed too, as
    ``nn.CrossEntropyLoss`` does.

    Args:
        epsilon: smoothing mass in ``(0, 1)`` (paper: 0.1).
        criterion_attr: the module's criterion attribute (default: its single loss-module attribute).

    Example::

        trainer = L.Trainer(callbacks=[LabelSmoothing(0.1)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: needs the criterion as a module attribute (``self.criterion = nn.CrossEntropyLoss()``), refused in
    ``setup`` otherwise, and refused when that criterion already smooths (``label_smoothing > 0``).
    """

    takes_over: frozenset[str] = frozenset({"criterion"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ("LabelSmoothing",)  # two would set the same option

    def __init__(self, epsilon: float = 0.1, criterion_attr: str | None = None) -> None:
        check_number("epsilon", epsilon, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if criterion_attr is not None and (not isinstance(criterion_attr, str) or not criterion_attr.isidentifier()):
            raise ValueError(f"criterion_attr must be an attribute name, got {criterion_attr!r}.")
        self.epsilon = float(epsilon)
        self.criterion_attr = criterion_attr
        self._handle: CriterionHandle | None = None
        self._patch: MethodPatch | None = None

    def _check(self, crit: nn.Module, name: str) -> None:
        if isinstance(crit, nn.CrossEntropyLoss):
            if crit.label_smoothing:
                raise ValueError(f"LabelSmoothing: module.{name} already smooths labels (label_smoothing="
                                 f"{crit.label_smoothing}); remove one of the two.")
            return
        if not isinstance(crit, _soft_target_losses()):
            raise ValueError(
                f"LabelSmoothing: module.{name} is a {type(crit).__name__}, which has no label_smoothing option and "
                "takes no class-probability targets. Supported: nn.CrossEntropyLoss, FocalLoss, SoftTargetNLLLoss."
            )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        try:
            handle = CriterionHandle(pl_module, self.criterion_attr)
        except AttributeError as err:
            raise ValueError(f"LabelSmoothing cannot reach the module's loss: {err}") from None
        self._check(handle.criterion, handle.name)

    def _apply(self, pl_module: Any) -> None:
        handle = CriterionHandle(pl_module, self.criterion_attr)
        crit = handle.criterion
        self._check(crit, handle.name)
        if isinstance(crit, nn.CrossEntropyLoss):
            handle.set(label_smoothing=self.epsilon)
            self._handle = handle
            return
        epsilon = self.epsilon
        ignore_index = getattr(crit, "ignore_index", None)

        def make_wrapper(call_next: Any) -> Any:
            def forward(input: torch.Tensor, target: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                soft = smooth_targets(target, input.shape[1], epsilon, ignore_index).to(input.dtype)
                return call_next(input, soft, *args, **kwargs)

            return forward

        self._patch = MethodPatch(crit, "forward", make_wrapper)

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.restore()
            self._handle = None
        if self._patch is not None:
            self._patch.restore()
            self._patch = None

    @property
    def active(self) -> bool:
        """Whether the criterion is smoothed right now."""
        return self._handle is not None or self._patch is not None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.active:
            self._apply(pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove()

    def state_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # nothing to restore: the smoothing is re-applied on the first resumed training batch
