"""DDP script for RNGStateCheckpoint: each rank saves and restores its own generators.

Launched by tests/test_rng_state.py::test_ddp_each_rank_restores_its_own_generators as ``python ddp_rng.py --out DIR``;
Lightning re-launches it once per rank (strategy="ddp", accelerator="cpu", devices=2, gloo). The module seeds each
rank differently in ``on_fit_start`` (so the ranks' dropout masks and numpy/Python draws differ), trains with
``nn.Dropout(0.5)``, and the run is checked for exact resume (straight vs. checkpoint at a mid-epoch step + resume).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_techniques import RNGStateCheckpoint
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.testing import assert_exact_resume, save_rank_result, script_out_dir

torch.set_num_threads(1)

TOTAL, SPLIT = 8, 3


class PerRankDropoutDigits(DigitsCNN):
    def __init__(self) -> None:
        super().__init__(channels=4)
        self.dropout = nn.Dropout(0.5)
        self.draws: dict[int, list[float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))

    def on_fit_start(self) -> None:
        # what a user does to give each rank its own augmentation stream (the resumed run's restore overrides it)
        seed = 100 + self.global_rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.draws[self.global_step] = [float(torch.rand(())), float(np.random.rand()), random.random()]
        return super().training_step(batch, batch_idx)


def main() -> None:
    out = script_out_dir()
    modules: list[PerRankDropoutDigits] = []
    callbacks: list[RNGStateCheckpoint] = []

    def make_module() -> PerRankDropoutDigits:
        modules.append(PerRankDropoutDigits())
        return modules[-1]

    def make_callbacks() -> list:
        callbacks.append(RNGStateCheckpoint())
        return [callbacks[-1]]

    straight = assert_exact_resume(
        make_module, DigitsDataModule, make_callbacks, out, total_steps=TOTAL, split_step=SPLIT,
        trainer_kwargs=dict(strategy="ddp", devices=2, limit_train_batches=5, limit_val_batches=1),
    )
    rank = straight["trainer"].global_rank
    straight_module, resumed_module = modules[0], modules[2]
    checkpoint = torch.load(out / "half.ckpt", weights_only=True)
    saved = checkpoint["callbacks"]["RNGStateCheckpoint"]
    save_rank_result(out, rank, {
        "rank": rank,
        "restored_from": callbacks[2].restored_from,
        "straight_draws": [straight_module.draws[s] for s in range(SPLIT, TOTAL)],
        "resumed_draws": [resumed_module.draws[s] for s in range(SPLIT, TOTAL)],
        "checkpoint_ranks": [int(r) for r in saved["states"]],
        "saved_torch_state": saved["states"][rank]["torch"],
        "weights": {k: v.detach().cpu() for k, v in resumed_module.state_dict().items()},
    })


if __name__ == "__main__":
    main()
