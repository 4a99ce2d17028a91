"""OptunaPruning: reporting by global step, pruning that stops the run, a missing monitor, resume, DDP."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.search import OptunaPruning

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                    max_epochs=2, limit_train_batches=6, val_check_interval=2, limit_val_batches=1,
                                    default_root_dir=str(tmp_path))
    settings.update(kwargs)
    return L.Trainer(callbacks=callbacks, **settings)


class _Recorder(Callback):
    """Records (global step, val_loss) at every validation end, before the pruning callback runs."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


class _PruneFromStep(optuna.pruners.BasePruner):
    def __init__(self, step: int) -> None:
        self.step = step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return max(trial.intermediate_values, default=-1) >= self.step


def _fit(trainer: L.Trainer, **kwargs: Any) -> None:
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16), **kwargs)


def test_reports_every_validation_by_global_step(tmp_path: Path) -> None:
    """Three validations per epoch: every one reaches the trial (reported by epoch, Optuna would ignore two)."""
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    recorder, pruning = _Recorder(), OptunaPruning(trial, monitor="val_loss")
    trainer = _trainer(tmp_path, [recorder, pruning])
    _fit(trainer)
    pruning.check_pruned()  # not pruned: no exception
    assert [step for step, _ in recorder.seen] == [2, 4, 6, 8, 10, 12]
    stored = study.get_trials(deepcopy=False)[0].intermediate_values
    assert stored == dict(recorder.seen) == pruning.reported
    assert not pruning.pruned and trainer.global_step == 12


def test_prune_stops_the_run_and_check_pruned_raises(tmp_path: Path) -> None:
    study = optuna.create_study(pruner=_PruneFromStep(4))
    trial = study.ask()
    pruning = OptunaPruning(trial, monitor="val_loss")
    trainer = _trainer(tmp_path, [pruning])
    _fit(trainer)
    assert trainer.global_step == 4  # stopped right after the validation that decided, mid-epoch
    assert pruning.pruned and pruning.pruned_step == 4
    assert pruning.pruned_value == pytest.approx(pruning.reported[4])
    with pytest.raises(optuna.TrialPruned, match=r"pruned at global step 4 \(val_loss="):
        pruning.check_pruned()


def test_median_pruner_prunes_a_worse_trial(tmp_path: Path) -> None:
    """With the median pruner, a trial whose loss trails a finished one's at the same step is stopped early."""
    study = optuna.create_study(direction="minimize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    for lr in (0.01, 1e-6):  # a useful LR, then one that cannot learn in 12 steps
        trial = study.ask()
        pruning = OptunaPruning(trial, monitor="val_loss")
        trainer = _trainer(tmp_path, [pruning])
        L.seed_everything(0, verbose=False)  # the same initial weights: only the LR differs
        trainer.fit(DigitsCNN(channels=4, lr=lr), datamodule=DigitsDataModule(batch_size=16))
        try:
            pruning.check_pruned()
            study.tell(trial, float(trainer.callback_metrics["val_loss"]))
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert second.state == optuna.trial.TrialState.PRUNED
    assert len(second.intermediate_values) < len(first.intermediate_values)
    step = max(second.intermediate_values)
    assert second.intermediate_values[step] > first.intermediate_values[step]


def test_a_monitor_the_module_never_logs_fails_at_the_first_validation(tmp_path: Path) -> None:
    pruning = OptunaPruning(optuna.create_study().ask(), monitor="val_accuracy")
    trainer = _trainer(tmp_path, [pruning])
    with pytest.raises(ValueError, match=r"OptunaPruning\(monitor='val_accuracy'\): the run has not logged "
                                         r"'val_accuracy' by the end of validation at global step 2; the logged "
                                         r"metrics are: .*val_acc, val_loss"):
        _fit(trainer)
    assert trainer.global_step == 2


def test_resume_reports_no_step_twice(tmp_path: Path) -> None:
    """A run checkpointed at step 4 reports steps 2, 4, 6 and dies before step 8's validation; resumed from the
    checkpoint, it validates at step 6 again: the trial already holds step 6, so only step 8 is reported."""
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    ckpt = tmp_path / "step4.ckpt"

    class SaveAt4KillAt8(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 4:
                trainer.save_checkpoint(ckpt)
            if trainer.global_step == 8:
                raise RuntimeError("killed")

    first = OptunaPruning(trial, monitor="val_loss")
    with pytest.raises(RuntimeError, match="killed"):
        _fit(_trainer(tmp_path, [first, SaveAt4KillAt8()]))
    assert sorted(study.get_trials(deepcopy=False)[0].intermediate_values) == [2, 4, 6]
    value_6 = study.get_trials(deepcopy=False)[0].intermediate_values[6]

    second = OptunaPruning(trial, monitor="val_loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_trainer(tmp_path, [second]), ckpt_path=str(ckpt))
    assert not [w for w in caught if "already reported" in str(w.message)], [str(w.message) for w in caught]
    stored = study.get_trials(deepcopy=False)[0].intermediate_values
    assert sorted(stored) == [2, 4, 6, 8, 10, 12]
    assert stored[6] == value_6  # the first run's value, not overwritten or duplicated
    assert 6 not in second.reported and 8 in second.reported  # the resumed callback skipped the stored step
    assert second.reported[2] == stored[2]  # restored from the checkpoint


def test_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    pruning = OptunaPruning(monitor="val_loss")  # its own in-memory one-trial study
    trainer = _trainer(tmp_path, [pruning], max_epochs=1)
    _fit(trainer)
    assert sorted(pruning.reported) == [2, 4, 6] and not pruning.pruned
    restored = OptunaPruning(monitor="val_loss")
    restored.load_state_dict(pruning.state_dict())
    assert restored.state_dict() == pruning.state_dict()


def test_own_study_with_a_threshold_pruner_stops_a_diverging_run(tmp_path: Path) -> None:
    pruning = OptunaPruning(monitor="val_loss", pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trainer = _trainer(tmp_path, [pruning])
    _fit(trainer)
    assert pruning.pruned and trainer.global_step == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="monitor must be the name of a logged metric"):
        OptunaPruning(monitor="")
    with pytest.raises(ValueError, match=r"direction='max' is not allowed"):
        OptunaPruning(direction="max")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trial must be an optuna.trial.Trial"):
        OptunaPruning(trial="trial-0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pruner must be an optuna.pruners.BasePruner"):
        OptunaPruning(pruner="median")  # type: ignore[arg-type]


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_rank_zero_holds_the_trial_and_every_rank_stops_together(tmp_path: Path) -> None:
    from lightning_techniques.testing import assert_ranks_agree, run_ddp_script

    script = Path(__file__).parent / "ddp" / "ddp_search_pruning.py"
    results = run_ddp_script(script, tmp_path)
    assert_ranks_agree(results, keys=["global_step", "pruned", "pruned_step", "reported_steps", "reported_values",
                                      "missing_error", "finished"])
    rank0, rank1 = results
    assert rank0["global_step"] == 4 and rank0["pruned"] and rank0["pruned_step"] == 4
    assert rank0["reported_steps"] == [2, 4] == rank0["trial_steps"]
    assert rank0["trial_state"].startswith("PRUNED: pruned at global step 4")
    assert "trial_state" not in rank1  # rank 1 had no trial
    assert "has not logged 'val_los'" in rank0["missing_error"] and "val_loss" in rank0["missing_error"]
