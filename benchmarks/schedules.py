"""Steps to a target validation accuracy for optimizers / LR schedules side by side on digits.

    python -m benchmarks.schedules [--target 0.9] [--epochs 3] [--repeats 2]

Every variant trains the demo ``DeepMLP`` (3 layers, width 64) on scikit-learn's digits with batch 64 for the
same number of epochs, validating every 5 optimizer steps. The baseline is the module's own
``configure_optimizers`` (SGD, momentum 0.9, lr 0.01, constant); the others are chosen with ``OptimizerCallback``
and ``LRSchedule`` only. Reported per variant (median over ``--repeats`` seeds, variants interleaved): optimizer
steps until val_acc first reaches ``--target`` ("never" when it does not) and the final val_acc. (No timing: the
callbacks add nothing per step but an LR multiplication, and this benchmark is about convergence.)
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import LRSchedule, OptimizerCallback
from lightning_techniques.demo import DeepMLP, DigitsDataModule


class ValAccTrace(L.Callback):
    def __init__(self) -> None:
        self.trace: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "val_acc" in trainer.callback_metrics:
            self.trace.append((trainer.global_step, float(trainer.callback_metrics["val_acc"])))


VARIANTS: dict[str, Callable[[], list[L.Callback]]] = {
    "baseline: module's SGD lr 0.01": lambda: [],
    "nesterov lr 0.1": lambda: [OptimizerCallback("nesterov", lr=0.1)],
    "nesterov lr 0.1 + cosine (warm-up 10%)": lambda: [OptimizerCallback("nesterov", lr=0.1),
                                                       LRSchedule("cosine", warmup_fraction=0.1)],
    "adamw 3e-3": lambda: [OptimizerCallback("adamw", lr=3e-3, weight_decay=1e-4)],
    "adamw 1e-2 + one-cycle": lambda: [OptimizerCallback("adamw", lr=1e-2, weight_decay=1e-4), LRSchedule("one_cycle")],
}


def make_run(name: str, epochs: int, target: float, seeds: list[int]) -> Callable[[], dict[str, Any]]:
    counter = iter(seeds)

    def run() -> dict[str, Any]:
        seed = next(counter)
        L.seed_everything(seed, verbose=False)
        trace = ValAccTrace()
        trainer = quiet_trainer(max_epochs=epochs, val_check_interval=5, callbacks=[*VARIANTS[name](), trace])
        trainer.fit(DeepMLP(depth=3, width=64), datamodule=DigitsDataModule(batch_size=64, seed=seed))
        reached = next((step for step, acc in trace.trace if acc >= target), None)
        return {"steps": reached, "final": trace.trace[-1][1]}

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = list(range(args.repeats))
    results = side_by_side({n: make_run(n, args.epochs, args.target, seeds) for n in VARIANTS}, repeats=args.repeats)
    rows = []
    for name, runs in results.items():
        reached = [r["steps"] for r in runs if r["steps"] is not None]
        rows.append({
            "variant": name,
            f"steps to val_acc>={args.target}": median(reached) if len(reached) == len(runs) else
            (f"{len(reached)}/{len(runs)} runs; " + (f"median {median(reached):.0f}" if reached else "never")),
            "final val_acc": median([r["final"] for r in runs]),
        })
    body = (
        f"DeepMLP (3 layers, width 64) on digits, batch 64, {args.epochs} epochs (~{args.epochs * 20} optimizer steps), "
        f"validation every 5 steps; median over {args.repeats} seeds (data split and init), variants interleaved. "
        "Only callbacks differ; the module is unmodified.\n\n" + markdown_table(rows)
    )
    record("schedules", "Optimizers and LR schedules: steps to target accuracy (digits)", body)


if __name__ == "__main__":
    main()
