"""Adversarial training on digits: clean and PGD robust test accuracy, and the cost per step, for standard training,
FGSM, PGD and VAT training side by side, several seeds.

    python -m benchmarks.adversarial [--seeds 3] [--epochs 8]

Per seed every variant gets the same model seed, data split and order and optimizer; the variants of one seed run
round-robin in one process (the standard run twice: the A/A row shows the timing noise). The robust accuracy is
measured with a 10-step L-inf PGD attack (step 2.5 eps / 10, random start, pixels kept in [0, 1]) on the test split, at
several eps. Step cost: main-thread CPU time (``time.thread_time``) and wall time per training step, as a ratio to the
standard run of the same seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.runner import markdown_table, quiet_trainer, record, side_by_side
from lightning_techniques import AdversarialTraining, VirtualAdversarialTraining
from lightning_techniques.demo import DeepMLP, DigitsDataModule
from lightning_techniques.functional import pgd

TRAIN_EPS = 0.1
ATTACK_EPS = (0.05, 0.1, 0.2)
VARIANTS: dict[str, Any] = {
    "standard": lambda: [],
    "standard again (A/A)": lambda: [],
    f"FGSM (eps {TRAIN_EPS})": lambda: [AdversarialTraining("fgsm", eps=TRAIN_EPS, input_range=[0.0, 1.0],
                                                            log=False)],
    f"PGD-3 (eps {TRAIN_EPS})": lambda: [AdversarialTraining("pgd", eps=TRAIN_EPS, steps=3, input_range=[0.0, 1.0],
                                                             log=False)],
    "VAT (eps 1.0, L2)": lambda: [VirtualAdversarialTraining(eps=1.0, input_range=[0.0, 1.0], log=False)],
}


class _StepCost(Callback):
    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = (time.thread_time(), time.perf_counter())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.cpu.append(time.thread_time() - self._start[0])
        self.wall.append(time.perf_counter() - self._start[1])


def robust_accuracy(model: nn.Module, data: DigitsDataModule, eps: float | None, seed: int) -> float:
    model.eval()
    correct = total = 0
    ce = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for x, y in data.test_dataloader():
        if eps is not None:
            x = pgd(model, x, y, ce, eps, steps=10, input_range=(0.0, 1.0), generator=gen)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def run(name: str, seed: int, epochs: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, seed=seed)
    model = DeepMLP(depth=3, width=64, optimizer="adam", lr=1e-2)
    cost = _StepCost()
    quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[*VARIANTS[name](), cost]).fit(model, data)
    data.setup("test")
    out = {"clean acc": robust_accuracy(model, data, None, seed)}
    for eps in ATTACK_EPS:
        out[f"PGD-10 acc, eps {eps}"] = robust_accuracy(model, data, eps, seed)
    out["cpu"] = statistics.median(cost.cpu[5:])
    out["wall"] = statistics.median(cost.wall[5:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        out = side_by_side({name: (lambda n=name, s=seed: run(n, s, args.epochs)) for name in VARIANTS}, repeats=1)
        for name in VARIANTS:
            results[name].append(out[name][0])
    load_after = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in VARIANTS:
        row: dict[str, Any] = {"training": name}
        for key in results[name][0]:
            if key in ("cpu", "wall"):
                continue
            values = [r[key] for r in results[name]]
            row[key] = f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        for key, label in (("cpu", "CPU time / step vs standard"), ("wall", "wall time / step vs standard")):
            ratios = [r[key] / base[key] for r, base in zip(results[name], results["standard"])]
            row[label] = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        rows.append(row)
    base_ms = statistics.median(r["cpu"] for r in results["standard"]) * 1e3
    body = (
        f"Command: `python -m benchmarks.adversarial --seeds {args.seeds} --epochs {args.epochs}`.\n\n"
        f"DeepMLP (3 layers, width 64) on digits (pixels in [0, 1]), Adam lr 1e-2, batch 64, {args.epochs} epochs, one "
        f"torch thread. Training attacks: FGSM and PGD-3 (L-inf, eps {TRAIN_EPS}, step 2.5 eps / 3, random start) "
        "with weight 1 (clean loss + adversarial loss); VAT with eps 1.0 (L2 per 64-pixel image), xi 1e-6, one power "
        "iteration, weight 1. Robust accuracy: test split under a 10-step L-inf PGD attack (random start, step "
        f"2.5 eps / 10, pixels in [0, 1]) at each eps. Accuracy cells: mean over {args.seeds} seeds (min-max); the "
        "runs of one seed share model seed, data split and order.\n\n"
        "Step cost: median main-thread CPU time (`time.thread_time`) and wall time per training step (first 5 steps "
        f"left out), as the median over seeds of the ratio to the standard run of the same seed (min-max); the "
        f"standard step takes {base_ms:.2f} ms of CPU. **The machine was heavily loaded** by other users (load "
        f"averages 1/5/15 min before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in load_after)} on {os.cpu_count()} cores): wall-time ratios are noisy (see the "
        "A/A row), CPU-time ratios less so; accuracies are not affected by the load.\n\n"
        + markdown_table(rows)
    )
    record("adversarial", "Adversarial training on digits: clean and PGD robust accuracy, cost per step", body)


if __name__ == "__main__":
    main()
