"""DDP run (2 CPU processes, gloo) for the foundation: LSUVInit, EarlyStopping and the shared mechanisms.

Launched by tests/test_ddp_foundation.py as ``python ddp_foundation.py --out DIR``; Lightning re-launches it for rank 1.
Each rank saves what it observed; the test asserts the ranks agree.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import EarlyStopping, LSUVInit
from lightning_techniques._internal import (
    SamplerSteering,
    add_batch_transform,
    add_loss_term,
    agree_any,
    all_reduce_sum,
    get_inputs,
    set_inputs,
)
from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule
from lightning_techniques.regularization.early_stopping import snapshot_state
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def trainer(**kwargs: Any) -> L.Trainer:
    base = dict(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    base.update(kwargs)
    return L.Trainer(**base)


class WeightsAfterInit(Callback):
    """Records the weights right after LSUV ran (it is placed after LSUVInit in the callbacks list)."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not hasattr(self, "weights"):
            self.weights = snapshot_state(pl_module)
            self.first_inputs = batch[0].sum().item()


class RankDependentScore(DigitsCNN):
    """Logs a per-rank validation score WITHOUT sync_dist: ranks would disagree without EarlyStopping's agreement."""

    def on_validation_epoch_end(self) -> None:
        scores = [0.9, 0.5, 0.3, 0.4, 0.45, 0.5, 0.6]
        epoch = min(self.current_epoch, len(scores) - 1)
        offset = [0.0, 0.3, -0.2, 0.25, 0.1, 0.0, 0.0][epoch] * self.global_rank  # rank 1 sees a different curve
        self.log("val_score", torch.tensor(scores[epoch] + offset))


class Mechanisms(Callback):
    """Exercises sampler steering, a batch transform, a loss term and the distributed helpers under DDP."""

    def __init__(self) -> None:
        self.indices: list[list[int]] = []
        self.inputs_sum = 0.0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        def factory(dataset: Any, loader: Any):
            n = len(dataset)
            return (lambda epoch: list(range(n))[::-1]), n  # a global order Lightning must not re-permute

        self.steering = SamplerSteering(trainer, factory, owner="Mechanisms")
        self.transform = add_batch_transform(
            trainer, pl_module, "tag", lambda b, s: set_inputs(b, get_inputs(b) * 0 + 1.0), stages=("train",)
        )
        self.term = add_loss_term(pl_module, "zero", lambda m, b, i, loss: 0.0 * loss)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.inputs_sum += float(batch[0].mean())
        self.indices.append(batch[2].tolist())

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.steering.remove()
        self.transform.remove()
        self.term.remove()


class IndexedDigits(DigitsDataModule):
    def train_dataloader(self):
        from torch.utils.data import DataLoader, Dataset

        base = self.train_dataset

        class WithIndex(Dataset):
            def __len__(self) -> int:
                return len(base)

            def __getitem__(self, i: int):
                x, y = base[i]
                return x, y, i

        return DataLoader(WithIndex(), batch_size=16, shuffle=True)


class ThreeTuple(DigitsCNN):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch[:2], batch_idx)


def main() -> None:
    out = script_out_dir()
    result: dict[str, Any] = {}

    # 1. LSUV: each rank sees a different first batch; rank 0's initialisation must be broadcast
    L.seed_everything(0, verbose=False)
    probe = WeightsAfterInit()
    lsuv = LSUVInit()
    t = trainer(max_steps=2, limit_val_batches=0, callbacks=[lsuv, probe])
    t.fit(DeepMLP(depth=8), datamodule=DigitsDataModule())
    rank = t.global_rank
    result["lsuv_weights"] = probe.weights
    result["lsuv_report"] = [r["variance_after"] for r in lsuv.report]
    result["lsuv_first_inputs_differ"] = probe.first_inputs

    # 2. EarlyStopping with rank-dependent metric values: decisions and restored weights must agree
    L.seed_everything(0, verbose=False)
    early = EarlyStopping(monitor="val_score", patience=2)
    model = RankDependentScore(channels=4)
    t = trainer(max_epochs=7, limit_train_batches=2, limit_val_batches=1, callbacks=[early])
    t.fit(model, datamodule=DigitsDataModule())
    result["es_stopped_epoch"] = early.stopped_epoch
    result["es_best_epoch"] = early.best_epoch
    result["es_best_score"] = float(early.best_score)
    result["es_final_weights"] = snapshot_state(model)

    # 3. mechanisms: steered global order, train transform, loss term, all-reduce / agreement
    L.seed_everything(0, verbose=False)
    mech = Mechanisms()
    t = trainer(max_steps=3, limit_val_batches=0, callbacks=[mech])
    t.fit(ThreeTuple(channels=4), datamodule=IndexedDigits())
    result["indices"] = mech.indices
    result["inputs_mean"] = mech.inputs_sum / max(1, len(mech.indices))
    result["dataset_len"] = len(t.datamodule.train_dataset)
    result["sum"] = all_reduce_sum(t.strategy, torch.tensor([float(rank + 1)], dtype=torch.float64))
    result["any"] = agree_any(t.strategy, rank == 1)

    # 4. the demo's train loader under DDP: not re-wrapped by Lightning, and mid-epoch resume is exact on every rank
    from lightning_techniques.testing import assert_exact_resume

    straight = assert_exact_resume(
        lambda: DigitsCNN(channels=4), DigitsDataModule, list, out / "resume", total_steps=14, split_step=5,
        trainer_kwargs=dict(strategy="ddp", devices=2, limit_val_batches=0),
    )
    result["resume_weights"] = snapshot_state(straight["module"])
    result["sampler_type"] = type(straight["trainer"].train_dataloader.sampler).__name__
    save_rank_result(out, rank, result)


if __name__ == "__main__":
    main()
