"""DDP trials inside optuna_search (2 CPU processes, gloo): the search runs on rank 0, Lightning's launcher starts
rank 1 at the first trial's fit, and rank 1 replays every trial with rank 0's values.

Launched by tests/test_search_optuna.py as ``python ddp_search_driver.py --out DIR``. Three trials; the pruner prunes
trial 1 at its second validation. Each rank records, per trial it trained: number, learning rate, final global step
and whether its OptunaPruning saw the trial pruned. Rank 0 also records the study's trial states.
"""

from __future__ import annotations

import logging
import os
import warnings

import lightning as L
import optuna
import torch

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.search import OptunaPruning, optuna_search
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
optuna.logging.set_verbosity(optuna.logging.WARNING)


class PruneTrialOne(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1 and max(trial.intermediate_values, default=-1) >= 4


def main() -> None:
    out = script_out_dir()
    torch.set_num_threads(1)
    trained: list[tuple] = []

    def build(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        L.seed_everything(trial.number, verbose=False)
        trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            max_steps=8, limit_train_batches=8, val_check_interval=2, limit_val_batches=1,
                            default_root_dir=str(out / "run"))
        trained.append((trial.number, lr, trainer))
        return trainer, DigitsCNN(channels=4, lr=lr), DigitsDataModule(batch_size=16)

    result = optuna_search(build, metric="val_loss", direction="minimize", n_trials=3, pruner=PruneTrialOne(),
                           sampler="random", seed=0, out=out / "search", plots=False, show_progress_bar=False)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    runs = []
    for number, lr, trainer in trained:
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, OptunaPruning))
        runs.append({"number": number, "lr": lr, "global_step": trainer.global_step, "pruned": pruning.pruned,
                     "reported": sorted(pruning.reported)})
    record = {"runs": runs, "returned": result is not None, "finished": True}
    if result is not None:
        record["states"] = [t.state.name for t in result.study.trials]
        record["params"] = [t.params["lr"] for t in result.study.trials]
    save_rank_result(out, rank, record)


if __name__ == "__main__":
    main()
