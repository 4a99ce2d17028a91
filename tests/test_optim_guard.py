"""NonFiniteGuard: skip steps with NaN/Inf gradients or loss, bit-identical weights, counting, stopping."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques.demo import DigitsCNN, DigitsDataModule, TabularMLP
from lightning_techniques.optim.guard import (
    MAX_RECORDED_STEPS,
    NonFiniteGuard,
    NonFiniteTrainingError,
    drop_gradients_,
    nonfinite_gradients,
    step_check,
)
from lightning_techniques.testing import assert_exact_resume, build_from_yaml


class PoisonBatches(Callback):
    """Replace the inputs of the given global batch indices with NaN, in place, and snapshot weights/state."""

    def __init__(self, batches: set[int], value: float = float("nan")) -> None:
        self.batches = set(batches)
        self.value = value
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        seen = trainer.fit_loop.total_batch_idx
        if seen in self.batches:
            batch[0].fill_(self.value)
            self.before[seen] = (copy.deepcopy(pl_module.state_dict()),
                                      copy.deepcopy(trainer.optimizers[0].state_dict()))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        seen = trainer.fit_loop.total_batch_idx
        if seen in self.batches:
            self.after[seen] = (copy.deepcopy(pl_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()))


def _same_state(a: Any, b: Any) -> bool:
    from lightning_techniques.testing import assert_same

    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------- core
def test_nonfinite_gradients_counts_parameters() -> None:
    a, b, c = (nn.Parameter(torch.ones(3)) for _ in range(3))
    a.grad = torch.tensor([1.0, float("nan"), 0.0])
    b.grad = torch.tensor([1.0, 2.0, float("inf")])
    c.grad = torch.zeros(3)
    assert nonfinite_gradients([a, b, c]) == 2
    c.grad = None
    assert nonfinite_gradients([c]) == 0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_dropped_gradients_leave_weights_and_optimizer_state_untouched(make_opt: Any) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = make_opt(model.parameters())
    for _ in range(2):  # build optimizer state first
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model(torch.full((5, 4), float("nan"))).sum().backward()
    assert nonfinite_gradients(model.parameters()) == 1  # the weight; the bias gradient stays finite
    drop_gradients_(model.parameters())
    opt.step()
    assert _same_state(weights, model.state_dict())
    assert _same_state(state, opt.state_dict())


# ---------------------------------------------------------------- integration
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nan_batch_is_skipped_bit_identically_and_training_continues(precision: str, trainer_kwargs: dict) -> None:
    L.seed_everything(0)
    poison = PoisonBatches({3})
    guard = NonFiniteGuard(max_consecutive_skips=3)
    model = DigitsCNN(channels=8)
    trainer = L.Trainer(max_steps=8, callbacks=[poison, guard], precision=precision, **trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    before_w, before_opt = poison.before[3]
    after_w, after_opt = poison.after[3]
    assert _same_state(before_w, after_w), "weights changed on the NaN step"
    assert _same_state(before_opt, after_opt), "optimizer state changed on the NaN step"
    assert guard.skipped_total == 1 and guard.skipped_steps == [3] and guard.consecutive_skips == 0
    assert trainer.global_step == 8
    assert float(trainer.callback_metrics["nonfinite_guard/skipped_total"]) == 1.0
    final = model.state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert not _same_state(after_w, final), "training did not continue after the skipped step"


def test_without_guard_a_nan_batch_destroys_the_weights(trainer_kwargs: dict) -> None:
    L.seed_everything(0)
    model = DigitsCNN(channels=8)
    trainer = L.Trainer(max_steps=5, callbacks=[PoisonBatches({3})], **trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert not all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_nonfinite_loss_with_finite_grads_is_skipped(trainer_kwargs: dict) -> None:
    class InfLoss(TabularMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 2:
                return loss + torch.tensor(float("inf"))  # the gradients stay finite
            return loss

    from lightning_techniques.demo import BreastCancerDataModule

    L.seed_everything(0)
    guard = NonFiniteGuard()
    trainer = L.Trainer(max_steps=4, callbacks=[guard], **trainer_kwargs)
    trainer.fit(InfLoss(), datamodule=BreastCancerDataModule())
    assert guard.skipped_steps == [2]


def test_consecutive_skips_raise_a_clear_error(trainer_kwargs: dict) -> None:
    L.seed_everything(0)
    guard = NonFiniteGuard(max_consecutive_skips=2)
    trainer = L.Trainer(max_steps=8, callbacks=[PoisonBatches({1, 2, 3}), guard], **trainer_kwargs)
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive optimizer steps"):
        trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
    assert guard.skipped_steps == [1, 2]


def test_consecutive_skips_can_stop_gracefully(trainer_kwargs: dict) -> None:
    L.seed_everything(0)
    guard = NonFiniteGuard(max_consecutive_skips=2, on_limit="stop")
    trainer = L.Trainer(max_steps=8, callbacks=[PoisonBatches({1, 2, 3}), guard], **trainer_kwargs)
    with pytest.warns(UserWarning, match="Stopping the run"):
        trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
    assert trainer.global_step == 3 and guard.skipped_total == 2


def test_accumulation_skips_the_whole_accumulated_step(trainer_kwargs: dict) -> None:
    L.seed_everything(0)
    poison = PoisonBatches({2})  # second micro-batch of the second step (k=2)
    guard = NonFiniteGuard()
    trainer = L.Trainer(max_steps=4, callbacks=[poison, guard], accumulate_grad_batches=2, **trainer_kwargs)
    trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
    assert guard.skipped_steps == [1]


def test_exact_resume(tmp_path: Path) -> None:
    straight = assert_exact_resume(
        lambda: DigitsCNN(channels=8),
        lambda: DigitsDataModule(batch_size=32),
        lambda: [PoisonBatches({1}), NonFiniteGuard()],
        tmp_path,
        total_steps=6,
        split_step=3,
    )
    guard = straight["callbacks"][1]
    assert guard.skipped_steps == [1]


def test_state_round_trip() -> None:
    guard = NonFiniteGuard()
    guard.skipped_total, guard.consecutive_skips, guard.skipped_steps = 3, 1, [2, 5, 9]
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()


# ---------------------------------------------------------------- bad input / YAML
@pytest.mark.parametrize(
    "kwargs, error",
    [({"max_consecutive_skips": 0}, ValueError), ({"max_consecutive_skips": 1.5}, TypeError),
     ({"on_limit": "ignore"}, ValueError)],
)
def test_bad_arguments(kwargs: dict, error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        NonFiniteGuard(**kwargs)


def test_builds_from_yaml(tmp_path: Path) -> None:
    cli = build_from_yaml(Path(__file__).resolve().parents[1] / "configs/callbacks/NonFiniteGuard.yaml",
                          extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    guard = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.max_consecutive_skips == 5


# ---------------------------------------------------------------- cost and bounded state
def test_max_abs_count_does_not_overflow_but_the_step_check_skips_an_overflowing_norm() -> None:
    # nonfinite_gradients (max-abs) never calls a finite value non-finite; the Guard's step check is the float32 L2
    # norm, as clip_grad_norm_(error_if_nonfinite=True): 1e30 squared overflows, a step AutoClip/AGC could not clip
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2, 2, dtype=torch.float16))
    a.grad, b.grad = torch.full((4,), 1e30), torch.full((2, 2), 6e4, dtype=torch.float16)
    assert nonfinite_gradients([a, b]) == 0
    total, loss_ok = step_check([a.grad, b.grad])
    assert not math.isfinite(total) and loss_ok
    total, _ = step_check([b.grad])  # fp16 values near their maximum are reduced in float32: no overflow
    assert total == pytest.approx(4 * 6e4 / 2, rel=1e-3)
    b.grad[0, 1] = float("nan")
    assert nonfinite_gradients([a, b]) == 1


def test_skipped_step_record_is_bounded() -> None:
    from types import SimpleNamespace

    guard = NonFiniteGuard(max_consecutive_skips=None)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = []
    for step in range(MAX_RECORDED_STEPS + 300):
        for p in model.parameters():
            p.grad = torch.full(p.shape, float("nan"))
        guard.on_before_optimizer_step(SimpleNamespace(strategy=None, global_step=step), model, opt)
        if step in (MAX_RECORDED_STEPS + 100, MAX_RECORDED_STEPS + 299):
            sizes.append(len(guard.state_dict()["skipped_steps"]))
    assert guard.skipped_total == MAX_RECORDED_STEPS + 300
    assert guard.skipped_steps == list(range(300, MAX_RECORDED_STEPS + 300))  # the most recent ones
    assert sizes == [MAX_RECORDED_STEPS, MAX_RECORDED_STEPS]


def test_log_false_logs_nothing(trainer_kwargs: dict) -> None:
    # regression: the switch was kept in ``self.log``, which Lightning overwrites with the module's log before setup
    for log in (False, True):
        guard = NonFiniteGuard(log=log)
        L.seed_everything(0)
        trainer = L.Trainer(max_steps=3, callbacks=[guard], log_every_n_steps=1, **trainer_kwargs)
        trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
        keys = {k for k in trainer.callback_metrics if k.startswith("nonfinite_guard/")}
        assert bool(keys) is log, keys


def test_step_check_leaves_gradients_bit_identical_and_covers_every_dtype() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 4), torch.randn(5).half(), torch.randn(2, 2).bfloat16(), torch.randn(3).double(),
             torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))]
    before = [g.clone() for g in grads]
    expected = math.sqrt(sum(float(g.to_dense().double().square().sum()) for g in grads))
    total, loss_ok = step_check(grads, [torch.tensor(0.5), torch.tensor(2.0, dtype=torch.bfloat16)])
    assert total == pytest.approx(expected, rel=1e-5) and loss_ok
    for g, b in zip(grads, before):
        assert torch.equal(g.to_dense(), b.to_dense())
    for i in range(4):
        poisoned = [g.clone() for g in grads]
        poisoned[i].view(-1)[0] = float("inf") if i % 2 else float("nan")
        assert not math.isfinite(step_check(poisoned)[0]), i
    sparse_nan = torch.sparse_coo_tensor([[1]], [float("nan")], (4,))
    assert not math.isfinite(step_check([grads[0], sparse_nan])[0])
    for bad in (float("nan"), float("inf")):  # a non-finite loss, alone or among several micro-batch losses
        assert step_check(grads, [torch.tensor(1.0), torch.tensor(bad)]) == (pytest.approx(expected, rel=1e-5), False)
        assert step_check([], [torch.tensor(bad)]) == (0.0, False)
    assert step_check([]) == (0.0, True)
