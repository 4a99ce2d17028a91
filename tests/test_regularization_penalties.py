"""L1Penalty / L2Penalty: the analytic gradient through a stock Trainer (also with accumulation and warm-up), which
parameters are penalised, logging, L1 sparsity on the demo CNN, bad input."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques import L1Penalty, L2Penalty
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.functional import penalty_parameters, warmup_coefficient, weight_penalty

W0 = torch.tensor([[0.5, -0.3, 0.2], [-0.1, 0.4, -0.6]])
LR = 0.5


class _Flat(L.LightningModule):
    """A loss whose data gradient is zero: every weight change comes from the penalty."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        with torch.no_grad():
            self.net.weight.copy_(W0)
            self.net.bias.fill_(0.7)
        self.automatic_optimization = not manual

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.norm(self.net(batch[0])) * 0.0).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=2)


def _fit(module: L.LightningModule, callbacks: list, **kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=1)
    base.update(kwargs)
    trainer = L.Trainer(callbacks=callbacks, **base)
    trainer.fit(module)
    return trainer


# ------------------------------------------------------------------------------------------------------ functional
def test_functional_gradients_are_sign_and_two_w() -> None:
    w = W0.clone().requires_grad_(True)
    weight_penalty([w], "l1").backward()
    assert torch.equal(w.grad, torch.sign(W0))
    w.grad = None
    weight_penalty([w], "l2").backward()
    assert torch.allclose(w.grad, 2 * W0)
    assert float(weight_penalty([W0], "l1")) == pytest.approx(2.1)
    assert float(weight_penalty([W0], "l2")) == pytest.approx(float((W0**2).sum()))


def test_warmup_coefficient_is_linear_then_flat() -> None:
    assert [warmup_coefficient(s, 0.4, 4) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert warmup_coefficient(0, 0.4, 0) == 0.4


# --------------------------------------------------------------------------------------- through a stock Trainer
@pytest.mark.parametrize(("cls", "grad"), [(L1Penalty, lambda w: torch.sign(w)), (L2Penalty, lambda w: 2 * w)],
                         ids=["l1", "l2"])
def test_one_sgd_step_follows_the_analytic_gradient(cls: type, grad: Any) -> None:
    module, lam = _Flat(), 0.01
    _fit(module, [cls(lam)])
    assert torch.allclose(module.net.weight.detach(), W0 - LR * lam * grad(W0), atol=1e-7)
    assert torch.all(module.net.bias == 0.7), "biases are not penalised by default"
    assert torch.all(module.norm.weight == 1) and torch.all(module.norm.bias == 0), "norm parameters are not"


def test_l1_and_l2_together_and_with_accumulation() -> None:
    module = _Flat()
    _fit(module, [L1Penalty(0.01), L2Penalty(0.02)], accumulate_grad_batches=2)
    # Lightning divides each micro-batch loss by 2 and the term is added to each: one full gradient per step
    expected = W0 - LR * (0.01 * torch.sign(W0) + 2 * 0.02 * W0)
    assert torch.allclose(module.net.weight.detach(), expected, atol=1e-7)


def test_warmup_scales_the_gradient_by_step() -> None:
    module, lam = _Flat(), 0.01
    _fit(module, [L1Penalty(lam, warmup_steps=4)], max_steps=3)
    # steps 0, 1, 2 use lambda * 0, 1/4, 2/4 (no weight crosses zero)
    assert torch.allclose(module.net.weight.detach(), W0 - LR * lam * 0.75 * torch.sign(W0), atol=1e-7)


def test_parameter_selection() -> None:
    module = _Flat()
    assert [n for n, _ in penalty_parameters(module)] == ["net.weight"]
    assert [n for n, _ in penalty_parameters(module, include="weight|bias")] == [
        "net.weight", "net.bias", "norm.weight", "norm.bias"]
    assert [n for n, _ in penalty_parameters(module, include=".", layer_types=["Linear"])] == ["net.weight", "net.bias"]
    cnn = DigitsCNN(channels=4)
    assert [n for n, _ in penalty_parameters(cnn, exclude=r"^features\.")] == ["head.weight"]
    with pytest.raises(ValueError, match=r"Trainable parameters of the model: \['net.weight', 'net.bias'"):
        penalty_parameters(module, include="^nothing$")
    # the selection the callback uses, through include: biases penalised too
    module = _Flat()
    _fit(module, [L1Penalty(0.01, include=r"^net\.")])
    assert torch.allclose(module.net.bias.detach(), torch.full((2,), 0.7 - LR * 0.01))


def test_logged_at_the_cadence_and_switchable() -> None:
    module = _Flat()
    trainer = _fit(module, [L2Penalty(0.01)], max_steps=2)
    metrics = trainer.callback_metrics
    assert float(metrics["l2_penalty/coefficient"]) == pytest.approx(0.01)
    # logged on the last step, computed from the weights after the first step
    w1 = W0 - LR * 0.01 * 2 * W0
    assert float(metrics["l2_penalty/term"]) == pytest.approx(0.01 * float((w1**2).sum()), rel=1e-6)
    trainer = _fit(_Flat(), [L2Penalty(0.01, log=False)], max_steps=2)
    assert not any(k.startswith("l2_penalty") for k in trainer.callback_metrics)


def test_l1_gives_sparsity_on_the_demo_cnn() -> None:
    def fraction_near_zero(callbacks: list) -> tuple[float, float]:
        L.seed_everything(0, verbose=False)
        module = DigitsCNN(channels=4)
        trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=callbacks)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
        w = torch.cat([p.detach().flatten() for n, p in module.named_parameters() if n.endswith("weight")])
        return float((w.abs() < 1e-2).float().mean()), float(trainer.callback_metrics["train_loss"])

    plain, plain_loss = fraction_near_zero([])
    sparse, sparse_loss = fraction_near_zero([L1Penalty(1e-4)])
    assert sparse > 3 * plain and sparse > 0.2, (plain, sparse)
    assert sparse_loss < 2.4, "still a usable loss"
    assert plain_loss < 2.4


def test_manual_optimisation_is_refused_before_any_step() -> None:
    module = _Flat(manual=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[L1Penalty(0.01)])
    with pytest.raises(ValueError, match="automatic optimisation"):
        trainer.fit(module)
    assert "training_step" not in vars(module)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"coefficient": 0.0}, ValueError, "coefficient must be"),
        ({"coefficient": "1e-4"}, TypeError, "coefficient must be a number"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 1.5}, TypeError, "warmup_steps must be an integer"),
        ({"include": "(["}, ValueError, "include='\\(\\[' is not a valid regular expression"),
        ({"layer_types": ["Nope"]}, ValueError, "cannot import layer type 'Nope'"),
        ({"log": "yes"}, TypeError, "log must be True or False"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        L1Penalty(**kwargs)
