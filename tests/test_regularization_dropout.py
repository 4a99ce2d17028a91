"""DropoutSchedule (rates per step against the formula, restored, exact resume with RNGStateCheckpoint) and MCDropout
(the K-pass statistics, what trainer.test logs recomputed by hand, predict results, modes restored, refusals)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_techniques import DropoutSchedule, MCDropout, RNGStateCheckpoint
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.functional import mc_dropout_predict, scheduled_dropout
from lightning_techniques.testing import assert_exact_resume


def _trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(**base)


class _RateRecorder(DigitsCNN):
    def __init__(self, dropout: float = 0.4) -> None:
        super().__init__(channels=4, dropout=dropout)
        self.rates: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.rates.append(self.dropout.p)
        return super().training_step(batch, batch_idx)


# --------------------------------------------------------------------------------------------- DropoutSchedule
def test_schedule_formulas() -> None:
    assert [scheduled_dropout(s, 0.5, 4) for s in range(6)] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert scheduled_dropout(2, 0.5, 4, start=0.1) == pytest.approx(0.3)
    curriculum = [scheduled_dropout(s, 0.5, 10, schedule="curriculum") for s in (0, 1, 10, 1000)]
    assert curriculum == pytest.approx([0.0, 0.5 * (1 - math.exp(-0.5)), 0.5 * (1 - math.exp(-5)), 0.5])
    assert scheduled_dropout(3, 0.4, 10, schedule="curriculum", gamma=0.2) == pytest.approx(0.4 * (1 - math.exp(-0.6)))


@pytest.mark.parametrize("schedule", ["linear", "curriculum"])
def test_rates_seen_by_training_step_follow_the_schedule_and_are_restored(schedule: str) -> None:
    module = _RateRecorder(dropout=0.4)
    _trainer(max_steps=5, callbacks=[DropoutSchedule(steps=4, schedule=schedule)]).fit(
        module, datamodule=DigitsDataModule(batch_size=32))
    assert module.rates == pytest.approx([scheduled_dropout(s, 0.4, 4, schedule=schedule) for s in range(5)])
    assert module.dropout.p == 0.4


def test_common_target_with_accumulation_and_restored_after_an_exception() -> None:
    class _Boom(L.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 2:
                raise RuntimeError("boom")

    module = _RateRecorder(dropout=0.4)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(max_steps=5, accumulate_grad_batches=2, callbacks=[DropoutSchedule(target=0.2, start=0.1, steps=2),
                                                                    _Boom()]).fit(
            module, datamodule=DigitsDataModule(batch_size=32))
    # two micro-batches per optimizer step share the step's rate
    assert module.rates == pytest.approx([0.1, 0.1, 0.15, 0.15])
    assert module.dropout.p == 0.4


def test_exact_resume_with_rng_state_checkpoint(tmp_path: Path) -> None:
    assert_exact_resume(lambda: DigitsCNN(channels=4, dropout=0.3), lambda: DigitsDataModule(batch_size=32),
                        lambda: [DropoutSchedule(steps=6, schedule="curriculum"), RNGStateCheckpoint()], tmp_path,
                        total_steps=6, split_step=3, trainer_kwargs={"limit_val_batches": 0})


def test_refuses_a_model_without_dropout_and_bad_arguments() -> None:
    trainer = _trainer(max_steps=1, callbacks=[DropoutSchedule()])
    with pytest.raises(ValueError, match=r"no dropout layer.*head \(Linear\)"):
        trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match="target must be"):
        DropoutSchedule(target=1.0)
    with pytest.raises(ValueError, match="schedule='cosine'"):
        DropoutSchedule(schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be"):
        DropoutSchedule(steps=0)
    with pytest.raises(TypeError, match="include must be a list"):
        DropoutSchedule(include="dropout")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- MCDropout
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(32), nn.Linear(32, 4))


def test_mc_dropout_predict_statistics_by_hand() -> None:
    model = _mlp().eval()
    x = torch.randn(5, 6)
    result = mc_dropout_predict(model, x, 7, seed=3)
    # by hand: the same masks (same seed), only dropout in train mode
    torch.manual_seed(3)
    model[2].train()
    probs = torch.stack([model(x).softmax(1) for _ in range(7)])
    model[2].eval()
    mean = probs.mean(0)
    entropy = -(mean * mean.log()).sum(1)
    expected = -(probs * probs.log()).sum(2).mean(0)
    assert torch.allclose(result["mean"], mean, atol=1e-6)
    assert torch.allclose(result["entropy"], entropy, atol=1e-5)
    assert torch.allclose(result["mutual_info"], (entropy - expected).clamp_min(0), atol=1e-5)
    assert (result["mutual_info"] > 0).all(), "dropout disagreement between passes is epistemic uncertainty"
    assert not model.training and not model[3].training, "modes restored (batch norm stays in eval)"
    deterministic = model(x).softmax(1)
    assert not torch.allclose(result["mean"], deterministic, atol=1e-3)
    state = torch.get_rng_state()
    again = mc_dropout_predict(model, x, 7, seed=3)
    assert torch.equal(state, torch.get_rng_state()), "the global random state is untouched"
    assert torch.equal(again["mean"], result["mean"])


def test_test_metrics_are_the_mc_statistics_of_the_test_batches() -> None:
    L.seed_everything(0, verbose=False)
    module, data = DigitsCNN(channels=4, dropout=0.3), DigitsDataModule(batch_size=64)
    callback = MCDropout(num_samples=5, seed=2)
    trainer = _trainer(callbacks=[callback], limit_test_batches=3)
    modes = [m.training for m in module.modules()]
    trainer.test(module, datamodule=data)
    assert [m.training for m in module.modules()] == modes, "modes as before test (Lightning's and ours restored)"
    module.eval()
    metrics = trainer.callback_metrics
    # recompute by hand over the same batches, with the callback's per-batch seeds
    correct = nll = entropy = mi = count = 0.0
    for idx, (x, y) in enumerate(data.test_dataloader()):
        if idx == 3:
            break
        out = mc_dropout_predict(module, x, 5, seed=2 * 1_000_003 + idx * 1009)
        correct += float((out["mean"].argmax(1) == y).sum())
        nll += float(-out["mean"].gather(1, y[:, None]).log().sum())
        entropy += float(out["entropy"].sum())
        mi += float(out["mutual_info"].sum())
        count += len(y)
    assert float(metrics["mc_dropout/test_acc"]) == pytest.approx(correct / count)
    assert float(metrics["mc_dropout/test_nll"]) == pytest.approx(nll / count, rel=1e-5)
    assert float(metrics["mc_dropout/test_entropy"]) == pytest.approx(entropy / count, rel=1e-5)
    assert float(metrics["mc_dropout/test_mutual_info"]) == pytest.approx(mi / count, rel=1e-4)


def test_predict_keeps_mean_and_uncertainty_per_batch() -> None:
    module, callback = DigitsCNN(channels=4, dropout=0.3), MCDropout(num_samples=4)
    trainer = _trainer(callbacks=[callback], limit_predict_batches=2)
    trainer.predict(module, datamodule=DigitsDataModule(batch_size=16))
    assert len(callback.predictions) == 2
    first = callback.predictions[0]
    n = len(next(iter(trainer.predict_dataloaders))[0])
    assert first["mean"].shape == (n, 10) and torch.allclose(first["mean"].sum(1), torch.ones(n))
    assert first["entropy"].shape == first["mutual_info"].shape == (n,)
    assert (first["mutual_info"] > 0).any()


def test_validation_stage_logged_during_fit() -> None:
    trainer = _trainer(max_steps=2, limit_val_batches=1, val_check_interval=2,
                       callbacks=[MCDropout(num_samples=3, stages=["validate"])])
    trainer.fit(DigitsCNN(channels=4, dropout=0.3), datamodule=DigitsDataModule(batch_size=32))
    assert "mc_dropout/val_acc" in trainer.callback_metrics


def test_mc_dropout_refusals() -> None:
    trainer = _trainer(callbacks=[MCDropout()])
    with pytest.raises(ValueError, match="no dropout layer"):
        trainer.test(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=32))
    with pytest.raises(ValueError, match="num_samples must be"):
        MCDropout(num_samples=1)
    with pytest.raises(ValueError, match=r"stages \['train'\]"):
        MCDropout(stages=["train"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        MCDropout(forward_fn=3)  # type: ignore[arg-type]


def test_forward_fn_receives_the_whole_batch() -> None:
    seen: list[Any] = []

    def forward_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(batch)
        return module(batch[0])

    callback = MCDropout(num_samples=2, forward_fn=forward_fn)
    _trainer(callbacks=[callback], limit_predict_batches=1).predict(
        DigitsCNN(channels=4, dropout=0.3), datamodule=DigitsDataModule(batch_size=16))
    assert len(seen) == 2 and isinstance(seen[0], (list, tuple)) and len(callback.predictions) == 1
