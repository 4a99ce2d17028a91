"""Initialisation schemes side by side on the demo's deep plain MLP: PyTorch's default vs. Xavier/Glorot vs.
He/Kaiming (``WeightInit``) vs. LSUV (``LSUVInit``), several seeds.

    python -m benchmarks.init_schemes [--seeds 5] [--steps 300] [--depth 20]

Per seed every scheme gets the same model seed, data order and optimizer (the demo's SGD, momentum 0.9, lr 0.01);
the schemes of one seed run round-robin in one process. Reports the mean training loss over the last 20 steps and
the validation accuracy after a fixed number of steps, per seed and as the median over seeds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import markdown_table, quiet_trainer, record, side_by_side
from lightning_techniques import LSUVInit, WeightInit
from lightning_techniques.demo import DeepMLP, DigitsDataModule

SCHEMES: dict[str, Callable[[], list[Callback]]] = {
    "default": lambda: [],
    "Xavier normal": lambda: [WeightInit("xavier_normal")],
    "He normal": lambda: [WeightInit("kaiming_normal", nonlinearity="relu")],
    "LSUV": lambda: [LSUVInit()],
}
TRAINED = 1.0  # a run "trains" when its final loss is below this (chance is ln 10 = 2.303)


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.values.append(float(outputs["loss"]))


def run(scheme: str, depth: int, seed: int, steps: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    losses = Losses()
    model = DeepMLP(depth=depth)
    datamodule = DigitsDataModule(seed=seed)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=SCHEMES[scheme]() + [losses])
    trainer.fit(model, datamodule=datamodule)
    (val,) = quiet_trainer().validate(model, datamodule=datamodule, verbose=False)
    return {"loss": statistics.mean(losses.values[-20:]), "acc": val["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--depth", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_techniques").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SCHEMES}
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        out = side_by_side({name: (lambda n=name, s=seed: run(n, args.depth, s, args.steps)) for name in SCHEMES},
                           repeats=1)
        row: dict[str, Any] = {"seed": seed}
        for name in SCHEMES:
            results[name].append(out[name][0])
            row[f"{name}: loss"] = out[name][0]["loss"]
        for name in SCHEMES:
            row[f"{name}: val acc"] = out[name][0]["acc"]
        rows.append(row)
    summary: dict[str, Any] = {"seed": "**median**"}
    trained: dict[str, Any] = {"seed": f"**seeds with loss < {TRAINED}**"}
    for name in SCHEMES:
        summary[f"{name}: loss"] = statistics.median(r["loss"] for r in results[name])
        trained[f"{name}: loss"] = f"{sum(r['loss'] < TRAINED for r in results[name])}/{args.seeds}"
    for name in SCHEMES:
        summary[f"{name}: val acc"] = statistics.median(r["acc"] for r in results[name])
        trained[f"{name}: val acc"] = ""
    body = (
        f"Command: `python -m benchmarks.init_schemes --seeds {args.seeds} --steps {args.steps} --depth {args.depth}`."
        f"\n\nDeepMLP (depth {args.depth}, ReLU, width 64, no normalisation, no residuals) on digits, the demo's SGD "
        f"(momentum 0.9, lr 0.01), batch 64, {args.steps} steps; the schemes of one seed share the model seed and the "
        "data order and run round-robin in one process. default = PyTorch's `nn.Linear` init (Kaiming uniform with "
        "a = sqrt(5), i.e. Var = 1/(3 fan_in)); Xavier normal = `WeightInit(\"xavier_normal\")` (gain 1); He normal = "
        "`WeightInit(\"kaiming_normal\")` (Var = 2/fan_in, ReLU); LSUV = `LSUVInit()` (orthogonal, then unit output "
        "variance per layer on the first batch). loss = mean training loss over the last 20 steps (chance = ln 10 = "
        "2.303); val acc after training. Losses and accuracies do not depend on the machine load.\n\n"
        + markdown_table(rows + [summary, trained])
    )
    record("init_schemes", "Initialisation schemes on a deep plain MLP: default vs. Xavier vs. He vs. LSUV", body)


if __name__ == "__main__":
    main()
