"""MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019): mix pairs of training samples and their targets, with
the soft-target loss handled through the criterion mechanism."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_techniques._internal.batch import get_inputs, get_targets, set_inputs, set_targets
from lightning_techniques._internal.batch_transforms import BatchTransformCallback
from lightning_techniques._internal.criterion import CriterionHandle
from lightning_techniques._internal.validation import check_choice, check_positive, check_probability
from lightning_techniques.augment._seeding import StepSeeder, default_seed

# ---------------------------------------------------------------------------------------------------------------- core


def soft_targets(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class-probability targets ``[B, K]``: one-hot of integer labels ``[B]``, or ``y`` itself when already soft."""
    if y.ndim == 2 and y.is_floating_point():
        if y.shape[1] != num_classes:
            raise ValueError(f"soft targets have {y.shape[1]} classes, expected num_classes={num_classes}.")
        return y.to(dtype)
    if y.ndim != 1 or y.is_floating_point():
        raise ValueError(f"targets must be integer class labels [B] or probabilities [B, K], got {y.dtype} "
                         f"of shape {tuple(y.shape)}.")
    message = f"target labels must be in [0, {num_classes})"
    if y.numel() and y.device.type != "cpu":  # checked on the device, without a host sync (device-side assert)
        torch._assert_async(((y >= 0) & (y < num_classes)).all(), message)
    try:  # on the CPU one_hot checks the range itself (one fused pass): no second check on the way
        return F.one_hot(y.long(), num_classes).to(dtype)
    except RuntimeError as error:
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or high >= num_classes:
            raise ValueError(f"{message}, got min {low}, max {high}.") from error
        raise


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam x + (1 - lam) x[perm], lam y + (1 - lam) y[perm])`` for soft targets ``y`` (Zhang et al. 2018)."""
    return torch.lerp(x, x[perm], 1.0 - lam), torch.lerp(y, y[perm], 1.0 - lam)  # x + (1 - lam) (x[perm] - x)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box ``(top, bottom, left, right)`` of area ``~(1 - lam) H W`` centred uniformly at random and clipped to
    the image (Yun et al. 2019, Algorithm A1)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def cutmix(
    x: torch.Tensor, y: torch.Tensor, box: tuple[int, int, int, int], perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste ``x[perm]``'s ``box`` into ``x [B, C, H, W]``; targets mixed by the pasted area's actual fraction.

    Returns ``(mixed_x, mixed_y, lam)`` with ``lam = 1 - box area / (H W)`` (the weight of the original sample).
    """
    top, bottom, left, right = box
    out = x.clone()
    out[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / float(x.shape[-2] * x.shape[-1])
    return out, lam * y + (1.0 - lam) * y[perm], lam


class _ReseededRNG:
    """One reusable numpy ``Generator`` whose PCG64 state is set from a (well-mixed) 63-bit seed for each batch:
    the draws are a pure function of the seed, as with ``np.random.default_rng(seed)``, at ~1/6 of its cost
    (``default_rng`` hashes the seed through a ``SeedSequence``: ~70 us per batch)."""

    def __init__(self) -> None:
        self.generator = np.random.Generator(np.random.PCG64(0))
        # numpy types BitGenerator.state as a Mapping; it is a fresh dict (mutated, then set back, in __call__)
        self._state = cast(dict[str, Any], self.generator.bit_generator.state)

    def __call__(self, seed: int) -> np.random.Generator:
        state = self._state
        state["state"]["state"] = int(seed)
        state["has_uint32"], state["uinteger"] = 0, 0
        self.generator.bit_generator.state = state
        return self.generator


class SoftTargetNLLLoss(nn.Module):
    """``-(y * log_probs).sum(1)`` (weighted by class ``weight``), averaged or summed: ``NLLLoss`` for
    class-probability targets, which ``nn.NLLLoss`` does not accept; integer targets go to ``F.nll_loss``.

    :class:`MixUp` / :class:`CutMix` swap a module's ``nn.NLLLoss`` for this one during the run (soft targets as in
    Zhang et al. 2018). Args: ``weight`` (per-class weights ``[K]``), ``reduction`` (``"mean"``: over the batch,
    as ``F.cross_entropy`` does with probability targets; ``"sum"``; ``"none"``).

    Example::

        loss = SoftTargetNLLLoss()(logits.log_softmax(1), mixed_targets)
    """

    weight: torch.Tensor | None  # buffer, registered in __init__

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        check_choice("reduction", reduction, ["mean", "sum", "none"])
        self.reduction = reduction
        self.register_buffer("weight", None if weight is None else weight.detach().clone(), persistent=False)

    def forward(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            return F.nll_loss(log_probs, target, weight=self.weight, reduction=self.reduction)
        weighted = target * log_probs if self.weight is None else target * self.weight * log_probs
        loss = -weighted.sum(dim=1)
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


# ------------------------------------------------------------------------------------------------------------ adapter


class _MixingCallback(BatchTransformCallback):
    takes_over: frozenset[str] = frozenset({"batch_transform", "criterion"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()
    _name = "mixing"
    _salt = 0

    def __init__(self, alpha: float, p: float, num_classes: int | None, seed: int | None,
                 input_key: str | int | None, target_key: str | int | None, criterion_attr: str | None) -> None:
        check_positive("alpha", alpha)
        check_probability("p", p)
        if num_classes is not None:
            check_positive("num_classes", num_classes, integer=True)
            if num_classes < 2:
                raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.alpha = float(alpha)
        self.p = float(p)
        self.num_classes = num_classes
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.criterion_attr = criterion_attr
        self.last_lam = 1.0  # mixing weight of the last training batch (1.0: not mixed)
        self._classes = num_classes
        self._seeder: StepSeeder | None = None
        self._criterion: CriterionHandle | None = None
        self._trainer: Any = None
        self._rng = _ReseededRNG()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        self._seeder = StepSeeder(default_seed(self.seed), salt=self._salt)
        if stage != "fit":
            return
        self._classes = self.num_classes or self._infer_num_classes(trainer, pl_module)
        self._prepare_criterion(pl_module)
        self.install_transform(trainer, pl_module, stages=("train",))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._criterion is not None:
            self._criterion.restore()
            self._criterion = None

    def _infer_num_classes(self, trainer: Any, pl_module: Any) -> int:
        for source in (getattr(trainer, "datamodule", None), pl_module):
            value = getattr(source, "num_classes", None)
            if value is None:
                value = (getattr(source, "hparams", None) or {}).get("num_classes")
            if isinstance(value, int) and value >= 2:
                return value
        raise ValueError(f"{type(self).__name__}: cannot infer the number of classes (neither the datamodule nor the "
                         "module has num_classes); pass num_classes=...")

    def _prepare_criterion(self, pl_module: Any) -> None:
        try:
            handle = CriterionHandle(pl_module, self.criterion_attr)
        except AttributeError as err:
            raise ValueError(f"{type(self).__name__} trains on soft (class-probability) targets and must check the "
                             f"module's criterion: {err}") from None
        crit = handle.criterion
        from lightning_techniques.data.imbalance import FocalLoss  # (data imports nothing from augment)

        if isinstance(crit, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, SoftTargetNLLLoss, FocalLoss)):
            return  # these accept class-probability targets natively
        if isinstance(crit, nn.NLLLoss):
            handle.replace(SoftTargetNLLLoss(crit.weight, crit.reduction))
            self._criterion = handle
            return
        raise ValueError(
            f"{type(self).__name__}: module.{handle.name} is a {type(crit).__name__}, which cannot take soft targets. "
            "Supported: CrossEntropyLoss (incl. label_smoothing), BCEWithLogitsLoss, FocalLoss, NLLLoss (replaced by "
            "SoftTargetNLLLoss for the run)."
        )

    def _mix(self, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def _transform(self, batch: Any, stage: str) -> Any:
        assert self._seeder is not None and self._classes is not None
        x = get_inputs(batch, self.input_key)
        y = soft_targets(get_targets(batch, self.target_key), self._classes,
                         x.dtype if x.is_floating_point() else torch.float32)
        rng = self._rng(self._seeder.next_seed(self._trainer))
        lam = 1.0
        if rng.random() < self.p and x.shape[0] > 1:
            lam = float(rng.beta(self.alpha, self.alpha))
            perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
            x, y, lam = self._mix(x, y, lam, perm, rng)
        self.last_lam = lam
        return set_targets(set_inputs(batch, x, self.input_key), y, self.target_key)

    def state_dict(self) -> dict[str, Any]:
        return {"last_lam": self.last_lam}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_lam = float(state_dict.get("last_lam", 1.0))


class MixUp(_MixingCallback):
    """Train on convex combinations of pairs of samples and of their one-hot targets.

    MixUp (Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018): with
    ``lam ~ Beta(alpha, alpha)`` and a random permutation of the batch, ``x' = lam x + (1 - lam) x[perm]`` and
    ``y' = lam y + (1 - lam) y[perm]``. Applied to the batch on the device before ``training_step``, in training only;
    the targets become class probabilities ``[B, K]``. ``nn.CrossEntropyLoss`` and ``nn.BCEWithLogitsLoss`` take
    them as they are; an ``nn.NLLLoss`` criterion is swapped for :class:`SoftTargetNLLLoss` for the run (through the
    criterion mechanism) and restored at teardown; any other criterion is refused in ``setup``. Draws come from
    ``(seed, global_step, micro-batch, rank)``: reproducible, exact on resume, different per DDP rank.

    Args:
        alpha: Beta distribution parameter (paper: 0.1-0.4 for ImageNet, 1.0 for CIFAR).
        p: probability that a batch is mixed (unmixed batches still get one-hot targets).
        num_classes: number of classes (default: the datamodule's or the module's ``num_classes``).
        seed: base seed (default: ``PL_GLOBAL_SEED`` from ``seed_everything``, else 0).
        input_key, target_key: where input and target are in a dict/tuple batch (default: elements 0 and 1).
        criterion_attr: name of the module's criterion attribute (default: the single loss-module attribute).

    Example::

        trainer = L.Trainer(callbacks=[MixUp(alpha=0.2)], max_epochs=10)
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: the module's ``training_step`` must pass the batch's targets to the criterion unchanged (training
    accuracy computed from them needs ``argmax``); attach one of MixUp / CutMix (both would mix twice).
    """

    _salt = 0x1A8

    def __init__(self, alpha: float = 0.2, p: float = 1.0, num_classes: int | None = None, seed: int | None = None,
                 input_key: str | int | None = None, target_key: str | int | None = None,
                 criterion_attr: str | None = None) -> None:
        super().__init__(alpha, p, num_classes, seed, input_key, target_key, criterion_attr)

    def _mix(self, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        if not x.is_floating_point():
            raise TypeError(f"MixUp needs a floating-point input, got {x.dtype}.")
        mx, my = mixup(x, y, lam, perm)
        return mx, my, lam


class CutMix(_MixingCallback):
    """Paste a random box of another training image into each image; mix the targets by the pasted area.

    CutMix (Yun, Han, Oh, Chun, Choe & Yoo, "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", ICCV 2019): ``lam ~ Beta(alpha, alpha)``, a box of area ``(1 - lam) H W`` at a uniform
    random centre (clipped to the image) is copied from ``x[perm]``; the targets are mixed with the actual area
    fraction. Training only, on the device; targets become class probabilities ``[B, K]`` with the same criterion
    handling as :class:`MixUp`. Draws come from ``(seed, global_step, micro-batch, rank)``.

    Args:
        alpha: Beta distribution parameter (paper: 1.0, i.e. ``lam`` uniform).
        p: probability that a batch is mixed (paper: 0.5 on ImageNet, 1.0 elsewhere).
        num_classes: number of classes (default: the datamodule's or the module's ``num_classes``).
        seed: base seed (default: ``PL_GLOBAL_SEED`` from ``seed_everything``, else 0).
        input_key, target_key: where input and target are in a dict/tuple batch (default: elements 0 and 1).
        criterion_attr: name of the module's criterion attribute (default: the single loss-module attribute).

    Example::

        trainer = L.Trainer(callbacks=[CutMix(alpha=1.0, p=0.5)], max_epochs=10)
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: needs ``[B, C, H, W]`` images; the same limits as :class:`MixUp`.
    """

    _salt = 0x1A9

    def __init__(self, alpha: float = 1.0, p: float = 1.0, num_classes: int | None = None, seed: int | None = None,
                 input_key: str | int | None = None, target_key: str | int | None = None,
                 criterion_attr: str | None = None) -> None:
        super().__init__(alpha, p, num_classes, seed, input_key, target_key, criterion_attr)

    def _mix(self, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        if x.ndim != 4:
            raise ValueError(f"CutMix needs [B, C, H, W] images, got an input of shape {tuple(x.shape)}.")
        box = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
        return cutmix(x, y, box, perm)
