"""AccumulationScheduler: exact step counts and effective batch per step, aligned boundaries, LR-schedule length,
resume (mid-epoch, with a resumable loader), DeepSpeed-style refusal, bad input, YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.optim.accumulation import (
    AccumulationScheduler,
    PlannedStep,
    aligned_factor,
    batch_size_warmup,
    factor_at,
    plan_accumulation,
)
from lightning_techniques.testing import assert_exact_resume, build_from_yaml

ROOT = Path(__file__).resolve().parents[1]


class StepRecorder(Callback):
    """Per optimizer step: micro-batches and samples since the previous step, where Lightning zeroed the gradients,
    and (``check_grads``) whether the gradient equals sum_i grad(loss_i) / k over exactly this group."""

    def __init__(self, check_grads: bool = False) -> None:
        self.check_grads = check_grads
        self.steps: list[tuple[int, int, int, int]] = []  # (epoch, first_batch, micro_batches, samples)
        self.zero_grad_at: list[tuple[int, int]] = []
        self.grad_errors: list[float] = []
        self._batches: list[Any] = []
        self._first = 0
        self._weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._batches:
            self._first = batch_idx
            if self.check_grads:
                self._weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._batches.append([t.clone() for t in batch])

    def on_before_zero_grad(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.zero_grad_at.append((trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        samples = sum(len(b[1]) for b in self._batches)
        self.steps.append((trainer.current_epoch, self._first, len(self._batches), samples))
        if self.check_grads:
            reference = DigitsCNN(channels=8)
            reference.load_state_dict(self._weights)
            k = trainer.accumulate_grad_batches
            for x, y in self._batches:
                (reference.criterion(reference(x), y) / k).backward()
            errors = [
                float((p.grad - r.grad).abs().max())
                for p, r in zip(pl_module.parameters(), reference.parameters())
            ]
            self.grad_errors.append(max(errors))
        self._batches = []


# ---------------------------------------------------------------- core
def test_factor_at_and_alignment() -> None:
    schedule = {0: 1, 3: 2, 5: 4}
    assert [factor_at(schedule, t) for t in range(7)] == [1, 1, 1, 2, 2, 4, 4]
    assert factor_at({2: 3}, 0) == 1
    assert aligned_factor(1, 2, 3) == 1 and aligned_factor(1, 2, 4) == 2 and aligned_factor(2, 4, 6) == 2


def test_plan_hand_computed() -> None:
    plan = plan_accumulation({0: 1, 3: 2, 5: 4}, "step", batches_per_epoch=10, max_epochs=2)
    got = [(p.epoch, p.first_batch, p.micro_batches, p.factor) for p in plan]
    assert got == [
        (0, 0, 1, 1), (0, 1, 1, 1), (0, 2, 1, 1),
        (0, 3, 1, 1),  # k=2 is due at step 3, but position 3 is odd: wait one step
        (0, 4, 2, 2),
        (0, 6, 2, 2),  # k=4 due at step 5, position 6 is not a multiple of 4
        (0, 8, 2, 4),  # switched at position 8; the epoch's last group has only 2 micro-batches
        (1, 0, 4, 4), (1, 4, 4, 4), (1, 8, 2, 4),
    ]
    assert [p.step for p in plan] == list(range(10))
    assert len(plan_accumulation({0: 1, 3: 2}, "step", 10, max_epochs=5, max_steps=7)) == 7
    by_epoch = plan_accumulation({0: 2, 1: 3}, "epoch", batches_per_epoch=7, max_epochs=2)
    assert [p.micro_batches for p in by_epoch] == [2, 2, 2, 1, 3, 3, 1]
    assert plan == [PlannedStep(p.step, p.epoch, p.first_batch, p.micro_batches, p.factor) for p in plan]


def test_batch_size_warmup_schedules() -> None:
    assert batch_size_warmup(8, 30) == {0: 1, 10: 2, 20: 4, 30: 8}
    assert batch_size_warmup(3, 10, growth="linear") == {0: 1, 5: 2, 10: 3}
    assert batch_size_warmup(6, 20) == {0: 1, 7: 2, 13: 4, 20: 6}
    assert batch_size_warmup(1, 10) == {0: 1}
    with pytest.raises(ValueError, match="final_factor"):
        batch_size_warmup(1, 10, start_factor=2)


# ---------------------------------------------------------------- integration
def _run(scheduler: AccumulationScheduler, trainer_kwargs: dict, recorder: StepRecorder | None = None,
         module: Any = None, **extra: Any) -> tuple[L.Trainer, StepRecorder]:
    L.seed_everything(0)
    recorder = recorder or StepRecorder()
    trainer = L.Trainer(callbacks=[scheduler, recorder], **{**trainer_kwargs, **extra})
    trainer.fit(module or DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
    return trainer, recorder


def test_step_schedule_matches_plan_exactly(trainer_kwargs: dict) -> None:
    scheduler = AccumulationScheduler({0: 1, 3: 2, 5: 4}, unit="step")
    trainer, rec = _run(scheduler, trainer_kwargs, StepRecorder(check_grads=True), max_epochs=2,
                        limit_train_batches=10)
    plan = scheduler.plan(trainer)
    assert [(s.epoch, s.first_batch, s.micro_batches, 32 * s.micro_batches) for s in plan] == rec.steps
    assert trainer.global_step == len(plan) == scheduler.total_optimizer_steps(trainer) == 10
    # Lightning zeroed the gradients exactly at each group's first micro-batch (no stale gradients) ...
    assert rec.zero_grad_at == [(s.epoch, s.first_batch) for s in plan]
    # ... and each step's gradient is exactly the mean loss gradient of its own group
    assert max(rec.grad_errors) < 1e-6
    assert [s["factor"] for s in scheduler.switches] == [2, 4]
    assert [(s["step"], s["batch"]) for s in scheduler.switches] == [(4, 4), (6, 8)]


def test_epoch_schedule_and_uneven_epochs(trainer_kwargs: dict) -> None:
    scheduler = AccumulationScheduler({0: 2, 1: 3}, unit="epoch")
    trainer, rec = _run(scheduler, trainer_kwargs, max_epochs=2, limit_train_batches=7)
    assert [s[2] for s in rec.steps] == [2, 2, 2, 1, 3, 3, 1]
    assert trainer.global_step == scheduler.total_optimizer_steps(trainer) == 7


def test_warmup_grows_the_effective_batch(trainer_kwargs: dict) -> None:
    scheduler = AccumulationScheduler(warmup_to=4, warmup_steps=4)
    trainer, rec = _run(scheduler, trainer_kwargs, max_steps=7)
    # {0: 1, 2: 2, 4: 4}: k=4 is due at step 4 (batch 6) but waits for batch 8, a multiple of 4
    assert [s[3] for s in rec.steps] == [32, 32, 64, 64, 64, 128, 128]
    assert scheduler.total_optimizer_steps(trainer) == 7


class OneCycleModule(DigitsCNN):
    def __init__(self, total: str) -> None:
        super().__init__(channels=8)
        self.total = total
        self.estimated: Any = None

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        self.estimated = self.trainer.estimated_stepping_batches
        if self.total == "plan":
            acc = next(cb for cb in self.trainer.callbacks if isinstance(cb, AccumulationScheduler))
            total = acc.total_optimizer_steps(self.trainer)
        elif self.total == "estimated":
            total = self.estimated
        else:
            total = int(self.total)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=int(total))
        return [opt], [{"scheduler": sched, "interval": "step"}]


@pytest.mark.parametrize("total", ["plan", "estimated"])
def test_lr_schedule_sees_the_true_number_of_steps(total: str, trainer_kwargs: dict) -> None:
    scheduler = AccumulationScheduler({0: 1, 2: 2}, unit="epoch")
    module = OneCycleModule(total)
    trainer, rec = _run(scheduler, trainer_kwargs, module=module, max_epochs=3, limit_train_batches=6)
    sched = trainer.lr_scheduler_configs[0].scheduler
    # Lightning alone would estimate ceil(6 / 1) * 3 = 18 steps
    assert module.estimated == len(rec.steps) == 6 + 6 + 3 == sched.total_steps
    assert sched.last_epoch == len(rec.steps)  # stepped once per optimizer step, ending exactly at the cycle's end
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    # the wrapper is gone after configure_optimizers and the Trainer's settings are back
    assert "configure_optimizers" not in module.__dict__
    assert trainer.max_steps == -1


def test_warns_when_an_lr_schedule_length_is_wrong(trainer_kwargs: dict) -> None:
    scheduler = AccumulationScheduler({0: 1, 1: 2}, unit="epoch")
    with pytest.warns(UserWarning, match="total_steps=16.*makes 12 optimizer steps"):
        _run(scheduler, trainer_kwargs, module=OneCycleModule("16"), max_epochs=2, limit_train_batches=8)


def test_exact_resume_mid_epoch(tmp_path: Path) -> None:
    straight = assert_exact_resume(
        lambda: DigitsCNN(channels=8),
        lambda: DigitsDataModule(batch_size=32),  # the demo loader is resumable mid-epoch
        lambda: [AccumulationScheduler({0: 1, 2: 2, 4: 4}, unit="step"), StepRecorder()],
        tmp_path,
        total_steps=8,
        split_step=4,  # mid-epoch (batch 6 of 12), k=2 in force and k=4 pending: the restored k decides the next group
        trainer_kwargs={"limit_train_batches": 12, "max_epochs": 3},
        compare_state=True,
    )
    scheduler = straight["callbacks"][0]
    assert scheduler.switches == [
        {"step": 2, "epoch": 0, "batch": 2, "factor": 2},
        {"step": 5, "epoch": 0, "batch": 8, "factor": 4},
    ]


class ReadsEstimate(DigitsCNN):
    def configure_optimizers(self) -> Any:
        self.estimated = self.trainer.estimated_stepping_batches
        return super().configure_optimizers()


def test_exact_resume_mid_epoch_when_configure_optimizers_reads_the_estimate(tmp_path: Path) -> None:
    # Lightning alone: reading estimated_stepping_batches in configure_optimizers (with max_epochs set) sets up the
    # train data before the checkpoint is restored, so a resumable loader's state is never loaded and a mid-epoch
    # resume replays the epoch. The scheduler's configure_optimizers wrapper hands the data set-up back to the loop.
    straight = assert_exact_resume(
        lambda: ReadsEstimate(channels=8),
        lambda: DigitsDataModule(batch_size=32),
        lambda: [AccumulationScheduler({0: 1, 2: 2}, unit="step")],
        tmp_path,
        total_steps=6,
        split_step=3,
        trainer_kwargs={"max_epochs": 3},
    )
    assert straight["module"].estimated == 6


# ---------------------------------------------------------------- misuse / bad input / YAML
class _OwnsAccumulation(SingleDeviceStrategy):
    @property
    def handles_gradient_accumulation(self) -> bool:
        return True


def test_refuses_a_strategy_that_owns_accumulation(trainer_kwargs: dict) -> None:
    kwargs = {k: v for k, v in trainer_kwargs.items() if k not in ("accelerator", "devices")}
    with pytest.raises(ValueError, match="owns gradient accumulation"):
        _run(AccumulationScheduler({0: 2}), kwargs, strategy=_OwnsAccumulation(torch.device("cpu")), max_steps=2)


def test_refuses_trainer_accumulate_grad_batches(trainer_kwargs: dict) -> None:
    with pytest.raises(ValueError, match="conflicts with AccumulationScheduler"):
        _run(AccumulationScheduler({0: 2}), trainer_kwargs, accumulate_grad_batches=3, max_steps=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "exactly one of"),
        ({"scheduling": {0: 0}}, ValueError, "scheduling"),
        ({"scheduling": {-1: 2}}, ValueError, "scheduling key"),
        ({"scheduling": {0: 2.5}}, TypeError, "scheduling"),
        ({"scheduling": {}}, TypeError, "non-empty"),
        ({"scheduling": {0: 2}, "unit": "batch"}, ValueError, "unit"),
        ({"warmup_to": 4}, ValueError, "warmup_steps"),
        ({"warmup_to": 4, "warmup_steps": 10, "unit": "epoch"}, ValueError, "unit='step'"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AccumulationScheduler(**kwargs)


def test_builds_from_yaml(tmp_path: Path) -> None:
    cli = build_from_yaml(ROOT / "configs/callbacks/AccumulationScheduler.yaml",
                          extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    acc = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AccumulationScheduler))
    assert acc.schedule == {0: 1, 20: 2, 60: 4} and acc.unit == "step"


# ---------------------------------------------------------------- DDP (the whole optim_stab group)
@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_group(tmp_path: Path) -> None:
    from lightning_techniques.testing import assert_ranks_agree, run_ddp_script

    results = run_ddp_script(ROOT / "tests" / "ddp" / "ddp_optim_stab.py", tmp_path)
    # weights, histories, decisions, plans: identical on both ranks (the per-micro-batch gradient norms are not:
    # that is the point of no_sync, checked below)
    assert_ranks_agree(results, keys=[k for k in results[0] if k != "acc_micro"])
    r = results[0]
    # NonFiniteGuard: rank 1's NaN at batch 2 skipped step 2 on both ranks, bit-identically, under bf16-mixed
    assert r["guard_skipped_steps"] == [2] and r["guard_weights_unchanged"] and r["guard_finite"]
    assert r["guard_precision"] == "bf16-mixed"
    # clipping acted on the synchronised gradients: identical AutoClip history on both ranks (checked above)
    assert len(r["autoclip_history"]) == 6 and r["agc_clipped_steps"] == 6 and r["autoclip_clipped_steps"] >= 1
    # AccumulationScheduler: the exact plan, per rank
    assert r["acc_steps"] == r["acc_plan"] == [1, 1, 2, 2, 2, 4, 4, 4]
    assert r["acc_total"] == r["acc_global_step"] == 8
    assert r["acc_switches"] == [[2, 2, 2], [5, 8, 4]]
    # gradient sync only on the stepping micro-batch: accumulating micro-batches hold local (different) gradients
    micro = [res["acc_micro"] for res in results]
    accumulating = micro[0][:, 0] == 1
    assert int(accumulating.sum()) == sum(r["acc_plan"]) - len(r["acc_plan"])
    assert torch.all(micro[0][accumulating, 1] != micro[1][accumulating, 1])
    assert torch.equal(micro[0][~accumulating, 1], micro[1][~accumulating, 1])
    # resumed under DDP from the end of epoch 0 (step 6, k=4 in force): same weights and switches as straight
    from lightning_techniques.testing import assert_same

    for res in results:
        assert_same(res["acc_weights"], res["acc_resumed_weights"], "acc resumed")
    assert r["acc_resumed_switches"] == [[2, 2, 2], [5, 8, 4]]
    assert r["acc_resumed_steps"] == [4, 4]
