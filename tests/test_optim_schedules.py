"""LRSchedule, ReduceLROnPlateau and their functional core (lr_at, schedule_total_steps, AgreedReduceLROnPlateau),
plus the DDP script of the whole optim_sched group."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import nn

from lightning_techniques.demo import DeepMLP, DigitsDataModule
from lightning_techniques.optim.optimizers import OptimizerCallback
from lightning_techniques.optim.schedules import (
    AgreedReduceLROnPlateau,
    LRSchedule,
    ReduceLROnPlateau,
    lr_at,
    schedule_total_steps,
)
from lightning_techniques.testing import assert_exact_resume, assert_ranks_agree, run_ddp_script

DDP_SCRIPT = Path(__file__).parent / "ddp" / "ddp_optim_sched.py"


def small_mlp(**kwargs):
    return DeepMLP(depth=2, width=16, **kwargs)


def quiet(**kwargs):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return base


class LRRecorder(L.Callback):
    """The LR of every group at each optimizer step (what the step really used)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def torch_lrs(make_scheduler, steps: int, base: float = 1.0) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = make_scheduler(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


# ---------------------------------------------------------------- functional core

def test_lr_at_hand_computed_warmup_and_decays() -> None:
    kw = dict(total=10, warmup_steps=4, min_ratio=0.1)
    assert [lr_at(s, schedule="cosine", **kw) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_at(7, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(7, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(7, schedule="polynomial", power=2.0, **kw) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)  # the floor after the end
    assert lr_at(50, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_at(3, total=10, schedule="constant", warmup_steps=0) == 1.0
    assert lr_at(6, total=10, schedule="step", step_size=3, gamma=0.5) == 0.25
    assert lr_at(2, total=10, schedule="exponential", gamma=0.9) == pytest.approx(0.81)


@pytest.mark.parametrize("name,make,kwargs", [
    ("one_cycle", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=20, pct_start=0.3,
                                                                cycle_momentum=False), {}),
    ("one_cycle", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=17, pct_start=0.25,
                                                                div_factor=10, final_div_factor=100,
                                                                cycle_momentum=False),
     {"pct_start": 0.25, "div_factor": 10, "final_div_factor": 100}),
    ("cosine_restarts", lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=0.1),
     {"cycle_steps": 5, "min_ratio": 0.1}),
    ("cosine_restarts", lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
     {"cycle_steps": 3, "cycle_mult": 2}),
    ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), {"step_size": 3, "gamma": 0.5}),
    ("exponential", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8), {"gamma": 0.8}),
    ("polynomial", lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=20, power=2.0), {"power": 2.0}),
    ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.05), {"min_ratio": 0.05}),
])
def test_lr_at_matches_torch_schedulers(name, make, kwargs) -> None:
    total = 17 if kwargs.get("pct_start") == 0.25 else 20
    reference = torch_lrs(make, total)
    ours = [lr_at(s, total, name, **kwargs) for s in range(total)]
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-9)


def test_schedule_total_steps_counts_scheduled_accumulation() -> None:
    # epochs of 10 batches, accumulating 1, 3, 4: 10 + ceil(10/3) + ceil(10/4) optimizer steps
    assert schedule_total_steps(10, 3, {0: 1, 1: 3, 2: 4}.__getitem__) == 10 + 4 + 3
    assert schedule_total_steps(10, 3, 2) == 15
    assert schedule_total_steps(10, 3, 1, max_steps=12) == 12
    with pytest.raises(ValueError, match="endless"):
        schedule_total_steps(10, -1)


def test_agreed_plateau_patience_cooldown_min_lr() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = AgreedReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1, cooldown=1, min_lr=0.02)
    lrs = []
    for value in [1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5]:
        scheduler.step(value)
        lrs.append(optimizer.param_groups[0]["lr"])
    # hand-computed: reduce after 2 non-improving checks, skip one check of cooldown, floor at min_lr
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.02])
    state = scheduler.state_dict()
    assert "agree" not in state and state["best"] == 0.5
    twin = AgreedReduceLROnPlateau(torch.optim.SGD([param], lr=0.1), agree=lambda v: v)
    twin.load_state_dict(state)
    assert twin.best == 0.5 and twin.agree is not None


def test_agreed_plateau_decides_on_the_agreed_value() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = AgreedReduceLROnPlateau(optimizer, agree=lambda v: 3.0, patience=0, factor=0.5)
    for value in [3.0, 2.0, 1.0]:  # this rank improves, but the agreed value does not
        scheduler.step(value)
    assert optimizer.param_groups[0]["lr"] == 0.25


# ---------------------------------------------------------------- LRSchedule on a stock Trainer

def test_schedule_follows_lr_at_on_the_modules_own_optimizer() -> None:
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    schedule = LRSchedule("cosine", warmup_steps=3, min_lr_ratio=0.1)
    trainer = L.Trainer(max_steps=12, callbacks=[schedule, recorder], **quiet())
    module = small_mlp(lr=0.05)  # its own configure_optimizers: SGD(lr=0.05)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert schedule.resolved_total_steps == 12
    expected = [0.05 * lr_at(s, 12, "cosine", warmup_steps=3, min_ratio=0.1) for s in range(12)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-12)
    assert float(trainer.callback_metrics["lr-pg0"]) == pytest.approx(expected[-1])
    assert "configure_optimizers" not in module.__dict__


def test_lr_is_logged_to_the_trainers_logger(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=4, callbacks=[LRSchedule("linear")], log_every_n_steps=1,
                        **quiet(logger=CSVLogger(tmp_path, name="run")))
    trainer.fit(small_mlp(lr=0.1), datamodule=DigitsDataModule())
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [float(r["lr-pg0"]) for r in rows if r.get("lr-pg0")]
    assert logged == pytest.approx([0.1, 0.075, 0.05, 0.025])  # the LR each step used


def test_lr_is_logged_at_the_log_every_n_steps_cadence(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    class LogSpy(L.Callback):  # the batches on which a new lr-pg0 value was published
        def __init__(self):
            self.calls = 0
            self._last = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            value = trainer.callback_metrics.get("lr-pg0")
            self.calls += value is not None and value is not self._last
            self._last = value

    for log, expected_calls in ((True, 3), (False, 0)):
        L.seed_everything(0, verbose=False)
        spy = LogSpy()
        trainer = L.Trainer(max_steps=7, callbacks=[spy, LRSchedule("linear", log=log)], log_every_n_steps=3,
                            **quiet(logger=CSVLogger(tmp_path, name=f"run{log}")))
        trainer.fit(small_mlp(lr=0.7), datamodule=DigitsDataModule())
        # steps 3 and 6 (the cadence) and 7 (the last), not every step (the loggers get the cadence steps only)
        assert spy.calls == expected_calls
        rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))) if log else []
        assert [float(r["lr-pg0"]) for r in rows if r.get("lr-pg0")] == pytest.approx([0.5, 0.2] if log else [])
        assert ("lr-pg0" in trainer.callback_metrics) is log
    with pytest.raises(TypeError, match="log must be True or False"):
        LRSchedule(log="yes")


@pytest.mark.parametrize("order", ["schedule_first", "optimizer_first"])
def test_composes_with_optimizer_callback_in_any_order(order: str) -> None:
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    pair = [LRSchedule("linear", warmup_fraction=0.25), OptimizerCallback("adamw", lr=0.02, weight_decay=0.01)]
    if order == "optimizer_first":
        pair.reverse()
    trainer = L.Trainer(max_steps=8, callbacks=[*pair, recorder], **quiet())
    trainer.fit(small_mlp(), datamodule=DigitsDataModule())
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    assert [c.scheduler.__class__.__name__ for c in trainer.lr_scheduler_configs] == ["LambdaLR"]
    expected = [0.02 * lr_at(s, 8, "linear", warmup_steps=2) for s in range(8)]
    assert [lr for lrs in recorder.lrs for lr in lrs] == pytest.approx([e for e in expected for _ in (0, 1)])
    assert {"lr-decay", "lr-no_decay"} <= set(trainer.callback_metrics)


def test_schedule_drives_both_halves_of_sparse_adam() -> None:
    from lightning_techniques.demo import ClassifierModule

    class BagOfPixels(ClassifierModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.EmbeddingBag(64 * 17, 8, mode="mean", sparse=True)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.embed((x.flatten(1) * 16).round().long() + torch.arange(64) * 17))

    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    trainer = L.Trainer(max_steps=5, callbacks=[LRSchedule("linear", warmup_steps=1),
                                                OptimizerCallback("sparse_adam", lr=0.01), recorder], **quiet())
    trainer.fit(BagOfPixels(), datamodule=DigitsDataModule())
    expected = [0.01 * lr_at(s, 5, "linear", warmup_steps=1) for s in range(5)]
    # groups: SparseAdam's "sparse", the dense AdamW's "params"
    assert [lr for lrs in recorder.lrs for lr in lrs] == pytest.approx([e for e in expected for _ in (0, 1)])


def test_steps_per_optimizer_step_under_accumulation() -> None:
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    schedule = LRSchedule("linear")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=9, accumulate_grad_batches=2,
                        callbacks=[schedule, recorder], **quiet())
    trainer.fit(small_mlp(lr=0.1), datamodule=DigitsDataModule())
    assert trainer.global_step == schedule.resolved_total_steps == 5  # ceil(9 / 2) optimizer steps
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([0.1 * (1 - s / 5) for s in range(5)])


def test_length_accounts_for_lightnings_accumulation_scheduler() -> None:
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    schedule = LRSchedule("linear")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=6,
                        callbacks=[GradientAccumulationScheduler({0: 1, 1: 3}), schedule, recorder], **quiet())
    trainer.fit(small_mlp(lr=0.1), datamodule=DigitsDataModule())
    # epoch 0: 6 steps, epoch 1: 2 steps. Lightning's own estimate uses the accumulation of the moment: 12 at
    # configure time (the LR would have stopped at 1/3 of its decay), 4 now.
    assert trainer.global_step == schedule.resolved_total_steps == 8
    assert trainer.estimated_stepping_batches != 8
    assert recorder.lrs[-1][0] == pytest.approx(0.1 / 8)


def test_length_asks_a_step_based_accumulation_scheduler() -> None:
    from lightning_techniques import AccumulationScheduler  # the optim group's step-based accumulation

    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    schedule = LRSchedule("linear")
    accumulation = AccumulationScheduler({0: 1, 4: 2}, unit="step")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=10, callbacks=[accumulation, schedule, recorder], **quiet())
    trainer.fit(small_mlp(lr=0.1), datamodule=DigitsDataModule())
    # 4 steps of 1 batch, then 6 batches in steps of 2: 7 optimizer steps, and the LR ends its decay on the last one
    assert trainer.global_step == schedule.resolved_total_steps == 7
    assert recorder.lrs[-1][0] == pytest.approx(0.1 / 7)


def test_step_based_accumulation_callback_asks_for_total_steps() -> None:
    class StepAccumulationScheduler(L.Callback):  # stands for a callback that changes accumulation by step
        pass

    trainer = L.Trainer(max_steps=2, callbacks=[StepAccumulationScheduler(), LRSchedule()], **quiet())
    with pytest.warns(UserWarning, match="Pass total_steps="):
        trainer.fit(small_mlp(), datamodule=DigitsDataModule())


@pytest.mark.parametrize("make_callbacks", [
    lambda: [OptimizerCallback("sgd", lr=0.05), LRSchedule("one_cycle", total_steps=8)],
    lambda: [LRSchedule("cosine_restarts", warmup_steps=1, cycle_steps=3, total_steps=8)],
], ids=["one_cycle", "cosine_restarts"])
def test_schedule_exact_resume(make_callbacks, tmp_path) -> None:
    straight = assert_exact_resume(small_mlp, DigitsDataModule, make_callbacks, tmp_path, total_steps=8)
    scheduler = straight["trainer"].lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 8


# ---------------------------------------------------------------- ReduceLROnPlateau on a stock Trainer

class PlateauModule(DeepMLP):
    """Logs a validation metric that never improves (a plateau by construction)."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("flat", 1.0)


def test_plateau_reduces_after_patience_and_logs_lr() -> None:
    L.seed_everything(0, verbose=False)
    lrs = []

    class EpochLR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    callback = ReduceLROnPlateau("flat", patience=1, factor=0.5, min_lr=0.03)
    trainer = L.Trainer(max_epochs=6, limit_train_batches=2, callbacks=[callback, EpochLR()],
                        **quiet(limit_val_batches=1))
    trainer.fit(PlateauModule(depth=2, width=16, lr=0.1), datamodule=DigitsDataModule())
    # epoch 0 sets the best; epochs 1, 2 do not improve -> halve after epoch 2; then again after epoch 4; floor 0.03
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.03])
    assert float(trainer.callback_metrics["lr-pg0"]) == pytest.approx(0.03)
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, AgreedReduceLROnPlateau)


def test_plateau_exact_resume(tmp_path) -> None:
    class StepPlateau(DeepMLP):
        def training_step(self, batch, batch_idx):
            self.log("flat_train", 1.0)
            return super().training_step(batch, batch_idx)

    # checked every 3 steps: the check at step 3 sets the best (before the split at 4), the one at step 6 (after
    # it) halves the LR only if the restored scheduler remembers that best. (A check exactly on the split step is
    # skipped by Lightning: when max_steps stops a run, the last batch's plateau update never runs.)
    straight = assert_exact_resume(
        lambda: StepPlateau(depth=2, width=16, lr=0.1), DigitsDataModule,
        lambda: [ReduceLROnPlateau("flat_train", patience=0, factor=0.5, interval="step", frequency=3)], tmp_path,
        total_steps=8,
    )
    assert straight["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)


# ---------------------------------------------------------------- bad input and misuse

def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule='cosinus' is not allowed"):
        LRSchedule("cosinus")
    with pytest.raises(ValueError, match="needs step_size"):
        LRSchedule("step")
    with pytest.raises(ValueError, match="needs cycle_steps"):
        LRSchedule("cosine_restarts")
    with pytest.raises(ValueError, match="not both"):
        LRSchedule(warmup_steps=2, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="smaller than total_steps"):
        LRSchedule(warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRSchedule(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="factor must be"):
        ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="mode='avg'"):
        ReduceLROnPlateau(mode="avg")
    with pytest.raises(ValueError, match="interval='batch'"):
        ReduceLROnPlateau(interval="batch")
    with pytest.raises(TypeError, match="monitor"):
        ReduceLROnPlateau(monitor=None)


def test_two_schedulers_on_one_optimizer_are_refused() -> None:
    module = small_mlp()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(max_steps=2, callbacks=[LRSchedule(), ReduceLROnPlateau()], **quiet())
    with pytest.raises(ValueError, match="LRSchedule cannot be used together with ReduceLROnPlateau"):  # in setup
        trainer.fit(module, datamodule=DigitsDataModule())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert "configure_optimizers" not in module.__dict__  # the failed fit left the module as it was

    class WithScheduler(DeepMLP):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 2)]

    trainer = L.Trainer(max_steps=2, callbacks=[LRSchedule()], **quiet())
    with pytest.raises(ValueError, match="StepLR"):
        trainer.fit(WithScheduler(depth=2, width=8), datamodule=DigitsDataModule())


def test_endless_run_needs_total_steps() -> None:
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, callbacks=[LRSchedule()], **quiet())
    with pytest.raises(ValueError, match="pass total_steps"):
        trainer.fit(small_mlp(), datamodule=DigitsDataModule())


def test_manual_optimisation_is_refused() -> None:
    class Manual(DeepMLP):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

    trainer = L.Trainer(max_steps=2, callbacks=[ReduceLROnPlateau()], **quiet())
    with pytest.raises(ValueError, match="automatic optimisation"):
        trainer.fit(Manual(depth=2, width=8), datamodule=DigitsDataModule())


# ---------------------------------------------------------------- DDP (the whole group)

@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_optimizers_and_schedules_agree(tmp_path) -> None:
    results = run_ddp_script(DDP_SCRIPT, tmp_path)
    assert_ranks_agree(results)
    r0 = results[0]
    # the schedule really ran: the recorded LRs follow lr_at under DDP
    expected = [0.02 * lr_at(s, 6, "cosine", warmup_steps=2) for s in range(6)]
    assert r0["adamw_cosine_lrs"] == pytest.approx(expected)
    # rank 1's metric improved every epoch, rank 0's never: both ranks reduced the LR as rank 0 decided
    assert r0["plateau_lrs"] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert r0["lbfgs_closure_calls"] > r0["lbfgs_steps"] and r0["lbfgs_loss_agreed"] is True
    assert r0["asgd_eval_is_averaged"] is True
    assert r0["lbfgs_finite"] is True
    assert r0["adamw_groups"] == ["decay", "no_decay"]
    assert r0["sparse_adam_kinds"] == ["SparseAdam", "AdamW"]
