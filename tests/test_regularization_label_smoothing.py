"""LabelSmoothing: the training loss equals nn.CrossEntropyLoss(label_smoothing=eps) (with ClassWeightedLoss's weights
too, and smoothed targets for its FocalLoss), validation loss unsmoothed, criterion restored, bad input."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_techniques import ClassWeightedLoss, FocalLoss, LabelSmoothing, MixUp
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.functional import smooth_targets

IMBALANCED = {"batch_size": 32, "keep_fraction": {0: 0.1, 1: 0.1}}


class _Recording(DigitsCNN):
    """The demo CNN, recording what its criterion saw and returned (training and validation)."""

    def __init__(self) -> None:
        super().__init__(channels=4)
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.seen.append((stage, logits.detach().clone(), y.clone(), loss.detach().clone()))
        return loss


def _fit(module: L.LightningModule, callbacks: list, data: DigitsDataModule | None = None, **kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=2)
    base.update(kwargs)
    trainer = L.Trainer(callbacks=callbacks, **base)
    trainer.fit(module, datamodule=data or DigitsDataModule(batch_size=32))
    return trainer


def test_smooth_targets_hand_made() -> None:
    soft = smooth_targets(torch.tensor([2, 0]), 3, 0.3)
    assert torch.allclose(soft, torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))
    probs = torch.tensor([[0.5, 0.5, 0.0]])
    assert torch.allclose(smooth_targets(probs, 3, 0.3), torch.tensor([[0.45, 0.45, 0.1]]))
    assert torch.equal(smooth_targets(torch.tensor([1, -100]), 3, 0.3, ignore_index=-100)[1], torch.zeros(3))
    # cross-entropy against the smoothed targets is PyTorch's label smoothing
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 1])
    expected = nn.CrossEntropyLoss(label_smoothing=0.3)(logits, y)
    assert torch.allclose(nn.CrossEntropyLoss()(logits, smooth_targets(y, 3, 0.3)), expected)


def test_training_loss_equals_cross_entropy_with_label_smoothing_and_validation_is_plain() -> None:
    module = _Recording()
    _fit(module, [LabelSmoothing(0.2)], limit_val_batches=1, val_check_interval=1, max_steps=2)
    train = [s for s in module.seen if s[0] == "train"]
    val = [s for s in module.seen if s[0] == "val"]
    assert len(train) == 2 and val
    for _, logits, y, loss in train:
        assert torch.allclose(loss, nn.CrossEntropyLoss(label_smoothing=0.2)(logits, y), atol=1e-6)
        assert not torch.allclose(loss, nn.CrossEntropyLoss()(logits, y), atol=1e-4)
    for _, logits, y, loss in val:
        assert torch.allclose(loss, nn.CrossEntropyLoss()(logits, y), atol=1e-6), "validation loss is not smoothed"
    assert module.criterion.label_smoothing == 0.0 and "forward" not in vars(module.criterion)


def test_composes_with_class_weighted_loss_in_both_orders() -> None:
    for order in ("first", "second"):
        module = _Recording()
        weights, smoothing = ClassWeightedLoss(mode="inverse"), LabelSmoothing(0.1)
        callbacks = [smoothing, weights] if order == "first" else [weights, smoothing]
        _fit(module, callbacks, DigitsDataModule(**IMBALANCED))
        w = weights.class_weights.float()
        for _, logits, y, loss in [s for s in module.seen if s[0] == "train"]:
            expected = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(logits, y)
            assert torch.allclose(loss, expected, atol=1e-6), order
        assert module.criterion.weight is None and module.criterion.label_smoothing == 0.0


def test_smooths_the_focal_loss_class_weighted_loss_swaps_in() -> None:
    module = _Recording()
    weights = ClassWeightedLoss(mode="inverse", focal_gamma=2.0)
    _fit(module, [LabelSmoothing(0.1), weights], DigitsDataModule(**IMBALANCED))
    focal = FocalLoss(2.0, weight=weights.class_weights.float())
    for _, logits, y, loss in [s for s in module.seen if s[0] == "train"]:
        assert torch.allclose(loss, focal(logits, smooth_targets(y, 10, 0.1)), atol=1e-6)
        assert not torch.allclose(loss, focal(logits, y), atol=1e-5)
    assert isinstance(module.criterion, nn.CrossEntropyLoss) and "forward" not in vars(module.criterion)


def test_with_mixup_soft_targets_are_smoothed_too() -> None:
    module = _Recording()
    _fit(module, [MixUp(alpha=0.4, seed=1), LabelSmoothing(0.1)])
    for _, logits, y, loss in [s for s in module.seen if s[0] == "train"]:
        assert y.is_floating_point()
        expected = nn.CrossEntropyLoss()(logits, smooth_targets(y, 10, 0.1))
        assert torch.allclose(loss, expected, atol=1e-6)


def test_restored_after_an_exception() -> None:
    class _Boom(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            raise RuntimeError("boom")

    module = _Recording()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, [LabelSmoothing(0.1), _Boom()])
    assert module.criterion.label_smoothing == 0.0


def test_refused_in_setup() -> None:
    class _FunctionalLoss(DigitsCNN):
        def __init__(self) -> None:
            super().__init__(channels=4)
            del self.criterion

        def _step(self, batch: Any, stage: str) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[LabelSmoothing(0.1)])
    with pytest.raises(ValueError, match="holds no loss module"):
        trainer.fit(_FunctionalLoss(), datamodule=DigitsDataModule(batch_size=32))
    already = DigitsCNN(channels=4)
    already.criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    with pytest.raises(ValueError, match="already smooths labels"):
        _fit(already, [LabelSmoothing(0.1)])
    mse = DigitsCNN(channels=4)
    mse.criterion = nn.MSELoss()
    with pytest.raises(ValueError, match="MSELoss, which has no label_smoothing"):
        _fit(mse, [LabelSmoothing(0.1)])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"epsilon": 0.0}, ValueError, r"epsilon must be a number in \(0.0, 1.0\)"),
    ({"epsilon": 1.0}, ValueError, "epsilon must be"),
    ({"epsilon": "0.1"}, TypeError, "epsilon must be a number"),
    ({"criterion_attr": "not an attr"}, ValueError, "criterion_attr"),
])
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LabelSmoothing(**kwargs)
