"""ReLoRA (Lialin et al. 2023): the restart merges B A into the base weight without changing the function, the
optimizer state of the factors is pruned by magnitude, the jagged cosine schedule re-warms after every restart, the
total update reaches a higher rank than plain LoRA of the same rank, exact resume across a restart; bad input."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset  # noqa: F401

from lightning_techniques import LRSchedule
from lightning_techniques.data.resumable import ResumableDataLoader, epoch_shuffle_sampler
from lightning_techniques.finetune.lora import apply_lora
from lightning_techniques.finetune.relora import (
    ReLoRA,
    lora_layers,
    numerical_rank,
    prune_optimizer_state,
    relora_lr_factor,
    relora_restart,
)
from lightning_techniques.testing import assert_exact_resume
from lightning_techniques.testing.contract import assert_exact_resume_epochs

DIM = 16


class Regression(L.LightningModule):
    """``y = x W*^T`` with a full-rank ``W*``: a full-rank target update for a low-rank method."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class RegressionData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, DIM, generator=g)
        self.y = self.x @ torch.randn(DIM, DIM, generator=g).T

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.x, self.y)  # the package's resumable loader: a resumed run sees the same batches
        return ResumableDataLoader(dataset, batch_size=32, sampler=epoch_shuffle_sampler(dataset, seed=1, trainer=self.trainer),
                                   datamodule=self)


def _trainer(steps: int, callbacks: list, **kwargs: object) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def test_jagged_cosine_schedule() -> None:
    total, every, warm, rewarm, floor = 40, 10, 3, 4, 0.1

    def cosine(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))

    assert relora_lr_factor(0, total, every, warm, rewarm, floor) == pytest.approx(1 / 4)
    assert relora_lr_factor(5, total, every, warm, rewarm, floor) == pytest.approx(cosine(5))
    for j in range(rewarm):  # the re-warm-up after the restart at step 20
        assert relora_lr_factor(20 + j, total, every, warm, rewarm, floor) == pytest.approx(cosine(20 + j) * (j + 1) / 5)
    assert relora_lr_factor(20 + rewarm, total, every, warm, rewarm, floor) == pytest.approx(cosine(24))
    assert relora_lr_factor(total + rewarm, total, every, warm, rewarm, floor) == pytest.approx(floor)


def test_restart_merges_the_update_and_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = Regression()
    apply_lora(model, ["linear"], rank=2, alpha=4.0)
    assert "peft_config" not in vars(model)
    (path, layer), = lora_layers(model)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, DIM)
    before_out, base_before = model(x), layer.get_base_layer().weight.clone()
    delta = layer.get_delta_weight("default")
    old_a = layer.lora_A["default"].weight.clone()
    params = relora_restart(model, torch.Generator().manual_seed(3))
    assert len(params) == 2
    assert torch.allclose(model(x), before_out, atol=1e-5), "a restart leaves the function unchanged"
    assert torch.allclose(layer.get_base_layer().weight, base_before + delta)
    assert not layer.lora_B["default"].weight.any() and not torch.equal(layer.lora_A["default"].weight, old_a)
    again = Regression()
    apply_lora(again, ["linear"], rank=2, alpha=4.0)
    relora_restart(again, torch.Generator().manual_seed(3))
    assert torch.equal(again.linear.lora_A["default"].weight, layer.lora_A["default"].weight), "seeded re-init"


def test_optimizer_state_magnitude_pruning() -> None:
    param = nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.Adam([param])
    param.grad = torch.arange(1.0, 11.0)
    optimizer.step()
    avg = optimizer.state[param]["exp_avg"].clone()
    assert prune_optimizer_state(optimizer, [param], "magnitude", 0.7) == 2
    kept = optimizer.state[param]["exp_avg"]
    assert torch.equal(kept[7:], avg[7:]) and not kept[:7].any(), "the 70 % smallest entries zeroed, the rest kept"
    assert float(optimizer.state[param]["step"]) == 1.0
    # one mask per parameter: both moments pruned where the first is small (independent masks left exp_avg != 0
    # with exp_avg_sq == 0, an update of exp_avg / eps - the factor A, which gets no gradient right after a restart
    # (B = 0), exploded)
    optimizer.state[param]["exp_avg"] = torch.arange(1.0, 11.0)
    optimizer.state[param]["exp_avg_sq"] = torch.arange(10.0, 0.0, -1.0)
    prune_optimizer_state(optimizer, [param], "magnitude", 0.5)
    assert torch.equal(optimizer.state[param]["exp_avg"] != 0, optimizer.state[param]["exp_avg_sq"] != 0)
    assert torch.equal(optimizer.state[param]["exp_avg_sq"][5:], torch.arange(5.0, 0.0, -1.0))
    prune_optimizer_state(optimizer, [param], "zero")
    assert not optimizer.state[param]["exp_avg_sq"].any()


def _update(model: Regression, initial: torch.Tensor) -> torch.Tensor:
    (_, layer), = lora_layers(model)
    return layer.get_base_layer().weight.detach() + layer.get_delta_weight("default").detach() - initial


def test_restarts_reach_a_higher_rank_update_than_plain_lora_of_the_same_rank() -> None:
    ranks, losses = {}, {}
    for name, every in (("lora", 10_000), ("relora", 10)):
        L.seed_everything(0, verbose=False)
        model = Regression()
        initial = model.linear.weight.detach().clone()
        callback = ReLoRA(targets=["linear"], r=2, alpha=4.0, restart_every=every, rewarm_steps=2, total_steps=60,
                          min_lr_ratio=0.5)
        _trainer(60, [callback]).fit(model, datamodule=RegressionData())
        assert callback.restarts == (5 if name == "relora" else 0)
        ranks[name] = numerical_rank(_update(model, initial))
        data = RegressionData()
        with torch.no_grad():
            losses[name] = float(nn.functional.mse_loss(model(data.x), data.y))
    assert ranks["lora"] <= 2
    assert ranks["relora"] >= 8, ranks
    assert losses["relora"] < losses["lora"], losses


def test_lr_follows_the_jagged_schedule_and_base_stays_frozen() -> None:
    L.seed_everything(0, verbose=False)
    model = Regression(lr=0.01)
    callback = ReLoRA(targets=["linear"], r=2, restart_every=4, rewarm_steps=2, warmup_steps=1, total_steps=10)

    seen: list[float] = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(10, [callback, Record()])
    trainer.fit(model, datamodule=RegressionData())
    expected = [0.01 * relora_lr_factor(s, 10, 4, 1, 2, 0.1) for s in range(10)]
    assert seen == pytest.approx(expected)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert model.linear.base_layer.weight.requires_grad, "requires_grad restored after fit"


@pytest.mark.parametrize("split", [4, 5])  # at a restart boundary (restart pending) and after it
def test_exact_resume_across_a_restart(tmp_path: Path, split: int) -> None:
    result = assert_exact_resume(
        make_module=Regression, make_datamodule=RegressionData,
        make_callbacks=lambda: [ReLoRA(targets=["linear"], r=2, restart_every=4, rewarm_steps=1, total_steps=9)],
        tmp_path=tmp_path, total_steps=9, split_step=split)
    assert result["callbacks"][0].restarts == 2


def test_exact_resume_after_a_kill_following_a_restart(tmp_path: Path) -> None:
    """Killed (an exception) right after the restart at step 4, resumed from that step's checkpoint: identical to the
    uninterrupted run over two epochs (8 batches each), restart count and LR schedule included."""
    result = assert_exact_resume_epochs(
        make_module=Regression, make_datamodule=RegressionData,
        make_callbacks=lambda: [ReLoRA(targets=["linear"], r=2, restart_every=4, rewarm_steps=1, total_steps=16)],
        tmp_path=tmp_path, max_epochs=2, limit_train_batches=8, kill_step=5)
    assert result["callbacks"][0].restarts == 3


def test_bad_input() -> None:
    for kwargs, match in (({"r": 0}, "r must"), ({"restart_every": 0}, "restart_every"),
                          ({"restart_every": 4, "rewarm_steps": 4}, "rewarm_steps"),
                          ({"reset_ratio": 1.5}, "reset_ratio"), ({"optimizer_reset": "half"}, "optimizer_reset")):
        with pytest.raises(ValueError, match=match):
            ReLoRA(targets=["linear"], **kwargs)  # type: ignore[arg-type]
    model = Regression()
    with pytest.raises(ValueError, match=r"nope.*linear"):
        _trainer(1, [ReLoRA(targets=["nope"])]).fit(model, datamodule=RegressionData())
    assert not lora_layers(model) and model.linear.weight.requires_grad, "nothing half-applied"
    with pytest.raises(ValueError, match="LRSchedule|ReLoRA"):
        _trainer(2, [ReLoRA(targets=["linear"]), LRSchedule(total_steps=2)]).fit(Regression(),
                                                                                  datamodule=RegressionData())
    # with lr_schedule="none" the LR is left to LRSchedule
    _trainer(2, [ReLoRA(targets=["linear"], lr_schedule="none", restart_every=1), LRSchedule(total_steps=2)]).fit(
        Regression(), datamodule=RegressionData())
