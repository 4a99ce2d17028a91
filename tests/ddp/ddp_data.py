"""DDP script for the data group (curriculum, self-paced scoring, class-weighted loss, oversampling).

Launched by tests/test_data_curriculum.py::test_ddp_data_techniques as ``python ddp_data.py --out DIR``; Lightning
re-launches it once per rank (strategy="ddp", accelerator="cpu", devices=2, gloo). Each rank records which dataset
indices it read, in order, and the techniques' state.
"""

from __future__ import annotations

import math
import os

import lightning as L
import torch

from lightning_techniques import ClassWeightedLoss, CurriculumLearning, Oversampling
from lightning_techniques.data.curriculum import (
    _epoch_generator,
    curriculum_order,
    difficulty_ranking,
    pacing_fraction,
)
from lightning_techniques.data.imbalance import weighted_draw
from lightning_techniques.data.labels import class_counts, find_labels
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.demo.data import LabeledTensorDataset
from lightning_techniques.testing import save_rank_result, script_out_dir

torch.set_num_threads(1)


class RecordingDataset(LabeledTensorDataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        super().__init__(inputs, targets)
        self.seen: list[int] = []

    def __getitem__(self, index: int):
        self.seen.append(int(index))
        return super().__getitem__(index)


class RecordingDigits(DigitsDataModule):
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if not isinstance(self.train_dataset, RecordingDataset):
            self.train_dataset = RecordingDataset(self.train_dataset.inputs, self.train_dataset.targets)


def trainer(max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=max_steps, callbacks=callbacks,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def main() -> None:
    out = script_out_dir()
    result: dict = {}
    imbalanced = {0: 0.05, 1: 0.05, 2: 0.2}

    # 1. curriculum with given scores, step pacing
    L.seed_everything(0)
    batch, full_at, start = 64, 6, 0.2
    dm = RecordingDigits(batch_size=batch)
    dm.setup()
    n = len(dm.train_dataset)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(5)).double()
    cl = CurriculumLearning(difficulty=scores, pacing="linear", start_fraction=start, full_at=full_at, seed=3)
    model = DigitsCNN(channels=4)
    t = trainer(10, [cl])
    t.fit(model, datamodule=dm)
    steps_epoch0 = math.ceil(n / 2) // batch
    ranked = difficulty_ranking(scores)
    plan0 = curriculum_order(ranked, n, 2 * batch,
                             lambda k: max(1, math.ceil(pacing_fraction(k, full_at, start, "linear") * n)),
                             _epoch_generator(3, 0))
    rank = t.global_rank
    result.update(n=n, batch=batch, full_at=full_at, start_fraction=start, scores=scores,
                  steps_epoch0=steps_epoch0, cl_plan0=plan0,
                  cl_seen=torch.tensor(dm.train_dataset.seen[: steps_epoch0 * batch]), cl_weights=flat(model),
                  cl_epoch_start=torch.as_tensor(cl.state_dict()["epoch_start"]))

    # 2. self-paced scoring (rank 0 scores, broadcast) with a rescoring at epoch 1
    L.seed_everything(0)
    sp = CurriculumLearning(difficulty="self_paced", start_fraction=0.3, full_at=10)
    model = DigitsCNN(channels=4)
    trainer(4, [sp]).fit(model, datamodule=DigitsDataModule(batch_size=256))  # 3 steps per epoch
    assert sp.scored_epoch == 1, sp.scored_epoch
    result["sp_scores"] = sp.scores
    result["sp_weights"] = flat(model)

    # 3. class-weighted loss: counts all-reduced over disjoint shares
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, keep_fraction=imbalanced)
    cw = ClassWeightedLoss(mode="effective", beta=0.99)
    trainer(2, [cw]).fit(DigitsCNN(channels=4), datamodule=dm)
    result["cw_weights"] = cw.class_weights
    result["cw_counts"] = cw.counts
    result["cw_single_counts"] = class_counts(find_labels(dm.train_dataset), 10)

    # 4. oversampling: one global weighted draw, disjoint position shares
    L.seed_everything(0)
    batch = 32
    dm = RecordingDigits(batch_size=batch, keep_fraction=imbalanced)
    os_cb = Oversampling(mode="inverse", seed=11)
    trainer(4, [os_cb]).fit(DigitsCNN(channels=4), datamodule=dm)
    generator = torch.Generator().manual_seed(11 * 1_000_003 + 0)
    result["os_plan0"] = weighted_draw(os_cb.weights, len(dm.train_dataset), True, generator)
    result["os_seen"] = torch.tensor(dm.train_dataset.seen[: 4 * batch])
    result["os_weights"] = os_cb.weights

    save_rank_result(out, rank, result)
    if rank == 0:
        print("ddp_data done", os.getpid())


if __name__ == "__main__":
    main()
