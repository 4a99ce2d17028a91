"""LSUV vs. PyTorch's default initialisation on the demo's deep MLP (no normalisation), side by side.

    python -m benchmarks.lsuv [--seeds 3] [--steps 300]

Same seeds, data order and optimizer (SGD, momentum 0.9, lr 0.01) for both; reports the mean training loss over the
last 20 steps and the validation accuracy after a fixed number of steps, for depth 20 and 30.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import markdown_table, quiet_trainer, record, side_by_side
from lightning_techniques import LSUVInit
from lightning_techniques.demo import DeepMLP, DigitsDataModule


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.values.append(float(outputs["loss"]))


def run(depth: int, seed: int, steps: int, lsuv: bool) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    losses = Losses()
    model = DeepMLP(depth=depth)
    datamodule = DigitsDataModule(seed=seed)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=([LSUVInit()] if lsuv else []) + [losses])
    trainer.fit(model, datamodule=datamodule)
    (val,) = quiet_trainer().validate(model, datamodule=datamodule, verbose=False)
    return {"loss": statistics.mean(losses.values[-20:]), "acc": val["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = []
    for depth in (20, 30):
        for seed in range(args.seeds):
            out = side_by_side(
                {
                    "default": lambda d=depth, s=seed: run(d, s, args.steps, False),
                    "lsuv": lambda d=depth, s=seed: run(d, s, args.steps, True),
                },
                repeats=1,
            )
            rows.append({
                "depth": depth,
                "seed": seed,
                "default init: loss": out["default"][0]["loss"],
                "LSUV: loss": out["lsuv"][0]["loss"],
                "default init: val acc": out["default"][0]["acc"],
                "LSUV: val acc": out["lsuv"][0]["acc"],
            })
    body = (
        f"DeepMLP (ReLU, width 64, no normalisation) on digits, SGD momentum 0.9 lr 0.01, batch 64, {args.steps} steps; "
        "loss = mean training loss over the last 20 steps (chance = ln 10 = 2.303); val acc after training.\n\n"
        + markdown_table(rows)
    )
    record("lsuv", "LSUV vs. default initialisation on a deep plain MLP", body)


if __name__ == "__main__":
    main()
