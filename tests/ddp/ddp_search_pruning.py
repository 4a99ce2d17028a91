"""DDP run (2 CPU processes, gloo) of OptunaPruning with the trial on rank 0 only.

Launched by tests/test_search_pruning.py as ``python ddp_search_pruning.py --out DIR``; Lightning re-launches it for
rank 1. Rank 0 holds an in-memory study's trial, rank 1 passes ``trial=None``; the pruner prunes at the second
validation. Both ranks must stop at the same global step, agree on what was reported and on the decision, and the
trial must end PRUNED (check_pruned raises optuna.TrialPruned on rank 0).

A second fit checks that a monitor the module never logs stops every rank with the same clear error.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import optuna
import torch

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.search import OptunaPruning
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
optuna.logging.set_verbosity(optuna.logging.WARNING)


class PruneFromStep(optuna.pruners.BasePruner):
    """Prunes once the trial has reported a step >= ``step`` (deterministic, whatever the metric)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return max(trial.intermediate_values, default=-1) >= self.step


def trainer(out, callbacks) -> L.Trainer:
    return L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_steps=20,
                     limit_train_batches=10, val_check_interval=2, limit_val_batches=1,
                     default_root_dir=str(out / "run"), callbacks=callbacks)


def main() -> None:
    out = script_out_dir()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    rank0 = int(__import__("os").environ.get("LOCAL_RANK", "0")) == 0
    study = optuna.create_study(direction="minimize", pruner=PruneFromStep(4)) if rank0 else None
    trial = study.ask() if study is not None else None
    pruning = OptunaPruning(trial, monitor="val_loss")
    run = trainer(out, [pruning])
    run.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16))
    result = {"global_step": run.global_step, "pruned": pruning.pruned, "pruned_step": pruning.pruned_step,
              "reported_steps": sorted(pruning.reported), "reported_values": [pruning.reported[s] for s in
                                                                              sorted(pruning.reported)]}
    if study is not None:
        try:
            pruning.check_pruned()
            state = "not pruned"
        except optuna.TrialPruned as err:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = f"{study.trials[0].state.name}: {err}"
        result["trial_state"] = state
        result["trial_steps"] = sorted(study.trials[0].intermediate_values)
    missing = OptunaPruning(study.ask() if study is not None else None, monitor="val_los")
    try:
        trainer(out, [missing]).fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16))
        result["missing_error"] = "no error"
    except ValueError as err:
        result["missing_error"] = str(err)
    result["finished"] = True
    save_rank_result(out, run.global_rank, result)


if __name__ == "__main__":
    main()
