"""FocalLoss on class-probability targets (found by the registry's combination tests: ClassWeightedLoss with
``focal_gamma`` + MixUp/CutMix failed at the first step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_techniques import FocalLoss


def test_gamma_zero_soft_targets_equal_cross_entropy_with_probabilities() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.softmax(torch.randn(6, 4), dim=1)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits, target, weight=weight, reduction=reduction)
        got = FocalLoss(gamma=0.0, weight=weight, reduction=reduction)(logits, target)
        torch.testing.assert_close(got, expected)


def test_one_hot_soft_targets_equal_hard_targets_and_the_formula() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    loss = FocalLoss(gamma=2.0)
    torch.testing.assert_close(loss(logits, F.one_hot(labels, 3).float()), loss(logits, labels))
    target = torch.softmax(torch.randn(5, 3), dim=1)
    p = torch.softmax(logits, dim=1)
    expected = (-(target * (1 - p) ** 2 * p.log()).sum(1)).mean()
    torch.testing.assert_close(loss(logits, target), expected)


def test_mismatched_soft_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        FocalLoss()(torch.randn(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="integer class targets"):
        FocalLoss()(torch.randn(2, 3), torch.rand(2))
