"""The shared per-step logging cadence: Lightning's log_every_n_steps steps plus the run's last training batch."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from test_contract_logging import RecordingLogger
from torch import nn

from lightning_techniques._internal.step_logging import (
    check_log_flag,
    log_step_metrics,
    resolve_log_flag,
    should_log_step,
)
from lightning_techniques.demo import DigitsCNN, DigitsDataModule


class Recorder(Callback):
    """Records should_log_step in every training-batch hook and logs a counter through log_step_metrics."""

    def __init__(self) -> None:
        self.start: list[bool] = []
        self.end: list[bool] = []
        self.logged: list[int] = []
        self.batches = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.start.append(should_log_step(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.end.append(should_log_step(trainer))
        self.batches += 1
        if log_step_metrics(pl_module, lambda: {"probe/batches": float(self.batches)}):
            self.logged.append(self.batches)


def _fit(trainer_kwargs: dict, **kwargs: Any) -> tuple[L.Trainer, Recorder]:
    L.seed_everything(0, verbose=False)
    recorder = Recorder()
    trainer = L.Trainer(callbacks=[recorder], **{**trainer_kwargs, **kwargs})
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=64))
    return trainer, recorder


def test_cadence_follows_log_every_n_steps_and_the_last_step(trainer_kwargs: dict) -> None:
    trainer, rec = _fit(trainer_kwargs, max_steps=7, log_every_n_steps=3, limit_val_batches=0)
    assert rec.logged == [3, 6, 7]  # the cadence, then the run's last step
    assert rec.start == rec.end  # the same answer before and after the optimizer step of a batch
    assert float(trainer.callback_metrics["probe/batches"]) == 7.0


def test_cadence_counts_optimizer_steps_under_accumulation(trainer_kwargs: dict) -> None:
    _, rec = _fit(trainer_kwargs, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=2, limit_val_batches=0)
    # batches 3-4 form optimizer step 2, batches 7-8 step 4 (also the last): every micro-batch of them qualifies
    assert rec.logged == [3, 4, 7, 8]


def test_epoch_bounded_run_logs_its_last_batch(trainer_kwargs: dict) -> None:
    trainer, rec = _fit(trainer_kwargs, max_epochs=2, limit_train_batches=5, log_every_n_steps=50,
                        limit_val_batches=0)
    assert rec.logged == [10]
    assert float(trainer.callback_metrics["probe/batches"]) == 10.0


def test_log_every_n_steps_zero_switches_step_logging_off(trainer_kwargs: dict) -> None:
    trainer, rec = _fit(trainer_kwargs, max_steps=3, log_every_n_steps=0, limit_val_batches=0)
    assert rec.logged == [] and "probe/batches" not in trainer.callback_metrics


class _SideBySide(Callback):
    """Logs the same value through ``pl_module.log`` (``ref/x``) and through ``log_step_metrics`` (``probe/x``), and
    counts the ``pl_module.log`` calls the latter makes."""

    def __init__(self) -> None:
        self.log_calls_for_probe = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        original = pl_module.log

        def counting(name: str, *args: Any, **kwargs: Any) -> Any:
            self.log_calls_for_probe += name.startswith("probe/")
            return original(name, *args, **kwargs)

        pl_module.log = counting

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        del pl_module.log

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        value = 0.5 + trainer.global_step
        pl_module.log("ref/x", value, on_step=True, on_epoch=False)
        log_step_metrics(pl_module, {"probe/x": value})


def test_step_metrics_reach_what_pl_module_log_reaches_without_calling_it(trainer_kwargs: dict) -> None:
    # LightningModule.log costs ~0.2 ms of CPU per key: log_step_metrics writes the same places directly
    logger = RecordingLogger()
    side = _SideBySide()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[side], max_steps=7, log_every_n_steps=3, limit_val_batches=0,
                        **{**trainer_kwargs, "logger": logger})
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=64))
    assert side.log_calls_for_probe == 0
    # the loggers: the same steps and values as Lightning writes for pl_module.log (the cadence steps)
    assert logger.steps_of("probe/x") == logger.steps_of("ref/x") == [(2, 2.5), (5, 5.5)]
    assert logger.saves >= 2
    # the run's last batch (off the cadence) reaches the callback metrics, as pl_module.log's value does
    ref, probe = trainer.callback_metrics["ref/x"], trainer.callback_metrics["probe/x"]
    assert float(probe) == float(ref) == 6.5 and probe.dtype == ref.dtype and probe.shape == ref.shape == ()
    assert float(trainer.logged_metrics["probe/x"]) == 6.5


def test_step_metrics_fall_back_to_pl_module_log(trainer_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # a Lightning that keeps its metrics elsewhere: the values still arrive, through pl_module.log
    from lightning_techniques._internal import compat

    monkeypatch.setattr(compat, "step_metric_stores", lambda trainer: None)
    logger = RecordingLogger()
    side = _SideBySide()
    trainer = L.Trainer(callbacks=[side], max_steps=4, log_every_n_steps=2, limit_val_batches=0,
                        **{**trainer_kwargs, "logger": logger})
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=64))
    assert side.log_calls_for_probe == 2  # batches 2 and 4: the cadence (4 is also the last)
    assert logger.steps_of("probe/x") == logger.steps_of("ref/x")
    assert float(trainer.callback_metrics["probe/x"]) == 3.5


def test_without_a_trainer_nothing_is_logged() -> None:
    assert log_step_metrics(nn.Linear(2, 2), {"x": 1.0}) is False


def test_check_log_flag() -> None:
    assert check_log_flag("log", False) is False
    with pytest.raises(TypeError, match="log_scalars must be True or False"):
        check_log_flag("log_scalars", 1)


def _techniques() -> list[Any]:
    from lightning_techniques import AccumulationScheduler, CurriculumLearning, InputNoise

    return [
        ("accumulation/", lambda log: AccumulationScheduler({0: 1, 2: 2}, log=log)),
        ("curriculum/", lambda log: CurriculumLearning(difficulty_fn=lambda s: float(s[1]), full_at=2, log=log)),
        ("input_noise/", lambda log: InputNoise(scale=0.1, log=log)),
    ]


@pytest.mark.parametrize("prefix, make", _techniques(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_step_wise_technique_has_a_working_log_switch(prefix: str, make: Any, trainer_kwargs: dict) -> None:
    # these logged on every step with no way to switch it off (each self.log costs ~0.2 ms of CPU)
    for log in (False, True):
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(callbacks=[make(log)], max_steps=3, log_every_n_steps=1, limit_val_batches=0,
                            **trainer_kwargs)
        trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=32))
        keys = {k for k in trainer.callback_metrics if k.startswith(prefix)}
        assert bool(keys) is log, (log, keys)
    with pytest.raises(TypeError, match="log must be True or False"):
        make("off")


# ------------------------------------------------------------------ renamed switches: the deprecated aliases of ``log``
def test_resolve_log_flag() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without an old name
        assert resolve_log_flag("Thing", None, log_values=None) is True
        assert resolve_log_flag("Thing", False, log_values=None) is False
    with pytest.warns(FutureWarning, match=r"Thing\(log_values=\.\.\.\) is deprecated.*Thing\(log=\.\.\.\)"):
        assert resolve_log_flag("Thing", None, log_values=False) is False
    with pytest.raises(ValueError, match="got both log and log_values"):
        resolve_log_flag("Thing", True, log_values=True)
    with pytest.raises(TypeError, match="log must be True or False"):
        resolve_log_flag("Thing", "no", log_values=None)
    with pytest.raises(TypeError, match="log_values must be True or False"), pytest.warns(FutureWarning):
        resolve_log_flag("Thing", None, log_values=0)


def _renamed() -> list[Any]:
    import lightning_techniques as lt

    return [
        (lt.L1Penalty, {}, "log_values"),
        (lt.L2Penalty, {}, "log_values"),
        (lt.AdversarialTraining, {}, "log_values"),
        (lt.VirtualAdversarialTraining, {}, "log_values"),
        (lt.WeightNoise, {}, "log_values"),
        (lt.DropoutSchedule, {}, "log_values"),
        (lt.LRSchedule, {}, "log_lr"),
        (lt.ReduceLROnPlateau, {}, "log_lr"),
        (lt.AdaLoRA, {"targets": ["head"]}, "log_ranks"),
    ]


@pytest.mark.parametrize("cls, kwargs, old", _renamed(), ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_renamed_switch_keeps_its_old_name_as_a_deprecated_alias(cls: type, kwargs: dict, old: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cls(**kwargs)._log_enabled is True
        assert cls(**kwargs, log=False)._log_enabled is False
    with pytest.warns(FutureWarning, match=rf"{cls.__name__}\({old}=\.\.\.\) is deprecated.*\(log=\.\.\.\)") as record:
        technique = cls(**kwargs, **{old: False})
    assert technique._log_enabled is False and "log" not in vars(technique)
    assert record[0].filename == __file__, "the warning points at the caller"
    with pytest.raises(ValueError, match=f"both log and {old}"):
        cls(**kwargs, log=True, **{old: True})
    with pytest.raises(TypeError, match="log must be True or False"):
        cls(**kwargs, log="off")
    with pytest.raises(TypeError, match=f"{old} must be True or False"), pytest.warns(FutureWarning):
        cls(**kwargs, **{old: "off"})


@pytest.mark.parametrize("old", ["log_values", None])
def test_old_switch_name_still_builds_from_yaml(old: str | None, tmp_path: Path) -> None:
    from lightning_techniques import L1Penalty
    from lightning_techniques.testing import build_from_yaml

    args = {"coefficient": 1e-4, old or "log": False}
    config = {"trainer": {"max_steps": 1, "default_root_dir": str(tmp_path),
                          "callbacks": [{"class_path": "lightning_techniques.L1Penalty", "init_args": args}]},
              "model": {"class_path": "lightning_techniques.demo.DigitsCNN"},
              "data": {"class_path": "lightning_techniques.demo.DigitsDataModule"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_from_yaml(config)
    (penalty,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, L1Penalty)]
    assert penalty._log_enabled is False
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning) and "log_values" in str(w.message)]
    assert bool(deprecations) is bool(old)
