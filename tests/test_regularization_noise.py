"""WeightNoise: noise statistics, the gradient taken at the noisy weights updates the clean ones (also with
accumulation), validation and the weights after fit are clean, restored after an exception, bad input."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques import WeightNoise
from lightning_techniques.functional import perturb_weights_, restore_weights_

W0 = torch.linspace(-1.0, 1.0, 200).reshape(10, 20)
LR = 0.1


class _Quadratic(L.LightningModule):
    """loss = sum w^2 (gradient 2 w): records the weights each training and validation step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(20, 10)
        with torch.no_grad():
            self.net.weight.copy_(W0)
            self.net.bias.fill_(0.5)
        self.seen_train: list[torch.Tensor] = []
        self.seen_val: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen_train.append(self.net.weight.detach().clone())
        return self.net.weight.pow(2).sum() + 0.0 * self.net(batch[0]).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_val.append(self.net.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 20)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(2, 20)), batch_size=2)


def _fit(module: L.LightningModule, callbacks: list, **kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=1)
    base.update(kwargs)
    trainer = L.Trainer(callbacks=callbacks, **base)
    trainer.fit(module)
    return trainer


def test_functional_noise_statistics_and_restore() -> None:
    w = torch.randn(300, 200)
    clean = perturb_weights_([w], 0.05, "additive", torch.Generator().manual_seed(0))[0]
    noise = w - clean
    assert abs(float(noise.std()) - 0.05) < 5 * 0.05 / (2 * noise.numel()) ** 0.5  # 5 standard errors
    assert abs(float(noise.mean())) < 5 * 0.05 / noise.numel() ** 0.5
    restore_weights_([w], [clean])
    assert torch.equal(w, clean)
    relative = perturb_weights_([w], 0.1, "multiplicative", torch.Generator().manual_seed(1))[0]
    ratio = (w - relative) / relative
    assert abs(float(ratio.std()) - 0.1) < 0.01
    with pytest.raises(ValueError, match="mode='uniform'"):
        perturb_weights_([w], 0.1, "uniform")  # type: ignore[arg-type]


def test_gradient_at_the_noisy_weights_updates_the_clean_ones() -> None:
    module = _Quadratic()
    _fit(module, [WeightNoise(std=0.05, seed=3)], max_steps=2, limit_val_batches=1, val_check_interval=1)
    first, second = module.seen_train
    assert not torch.equal(first, W0)
    assert 0.03 < float((first - W0).std()) < 0.07
    w1 = W0 - LR * 2 * first  # clean W0 stepped with the gradient 2 * (noisy weights)
    assert float((second - w1).std()) > 0.03, "fresh noise on the next step"
    w2 = w1 - LR * 2 * second
    assert torch.allclose(module.net.weight.detach(), w2, atol=1e-6), "the weights after fit hold no noise"
    assert torch.allclose(module.seen_val[0], w1, atol=1e-6), "validation sees the clean weights"
    assert torch.all(module.net.bias == 0.5), "biases are not perturbed by default (and get no gradient)"


@pytest.mark.parametrize("noise_first", [True, False])
def test_weights_set_in_another_on_train_batch_start_are_kept(noise_first: bool) -> None:
    """An initialisation on the first batch (LSUVInit does that) is what gets perturbed and restored, in any order
    of the callbacks (the noise is applied when training_step is called, after every on_train_batch_start)."""

    class _InitOnFirstBatch(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 0:
                with torch.no_grad():
                    pl_module.net.weight.fill_(0.3)

    module = _Quadratic()
    noise, init = WeightNoise(std=0.05, seed=3), _InitOnFirstBatch()
    _fit(module, [noise, init] if noise_first else [init, noise])
    seen = module.seen_train[0]
    assert 0.03 < float((seen - 0.3).std()) < 0.07
    assert torch.allclose(module.net.weight.detach(), torch.full_like(W0, 0.3) - LR * 2 * seen, atol=1e-6)
    assert "training_step" not in vars(module)


def test_accumulation_fresh_noise_per_micro_batch() -> None:
    module = _Quadratic()
    _fit(module, [WeightNoise(std=0.05, seed=3)], accumulate_grad_batches=2)
    a, b = module.seen_train
    assert not torch.equal(a, b)
    # each micro-batch loss is divided by 2: gradient = (2a + 2b) / 2
    assert torch.allclose(module.net.weight.detach(), W0 - LR * (a + b), atol=1e-6)


def test_same_seed_same_noise_other_seed_other_noise() -> None:
    runs = []
    for seed, global_seed in ((9, 0), (9, 1), (10, 0)):
        module = _Quadratic()
        torch.manual_seed(global_seed)  # the noise does not depend on torch's global random state
        _fit(module, [WeightNoise(std=0.05, seed=seed)])
        runs.append(module.seen_train[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_clean_weights_after_an_exception_mid_step() -> None:
    class _Boom(L.Callback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            raise RuntimeError("boom")

    module = _Quadratic()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, [WeightNoise(std=0.5), _Boom()])
    assert not torch.equal(module.seen_train[0], W0)
    assert torch.equal(module.net.weight.detach(), W0)


def test_logs_relative_noise_norm() -> None:
    trainer = _fit(_Quadratic(), [WeightNoise(std=0.05)])
    expected = 0.05 * (200**0.5) / float(W0.norm())
    assert float(trainer.callback_metrics["weight_noise/relative_norm"]) == pytest.approx(expected, rel=0.15)
    trainer = _fit(_Quadratic(), [WeightNoise(std=0.05, log=False)])
    assert "weight_noise/relative_norm" not in trainer.callback_metrics


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"std": 0.0}, ValueError, "std must be"),
    ({"mode": "uniform"}, ValueError, "mode='uniform'"),
    ({"include": "(["}, ValueError, "include="),
    ({"seed": -1}, ValueError, "seed must be"),
    ({"log": 1}, TypeError, "log must be True or False"),
])
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        WeightNoise(**kwargs)
