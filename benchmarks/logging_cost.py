"""Cost of the evaluation / interpretation loggers (eval_embed group) vs. the training epoch they run in.

    python -m benchmarks.logging_cost [--repeats 3]

On the demo transformer (TinyTransformer, digits, batch 64), one process, round-robin:

* the epoch time: ``fit`` for one epoch (20 training steps + validation on 270 samples) with a bare Trainer;
* the cost of one logging event: ``trainer.validate`` (or ``trainer.test``) with the callback minus without it
  (outside ``fit`` the loggers always log, so each call is one event);
* the overhead at the callback's default frequency: ``event cost / (every_n_val_epochs x epoch time)``.
  Target: < 10% of training time for the interpretation loggers.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import AttentionMapLogger, EvaluationReport, PermutationImportance, TSNELogger
from lightning_techniques.demo import DigitsDataModule, TinyTransformer

# (name, factory, stage, default every_n_val_epochs read from the class; None: test-time only)
VARIANTS: list[tuple[str, Callable[[], list[Any]], str, int | None]] = [
    ("EvaluationReport (validation)", lambda: [EvaluationReport()], "validate", EvaluationReport().every_n_val_epochs),
    ("TSNELogger (300 samples)", lambda: [TSNELogger()], "validate", TSNELogger().every_n_val_epochs),
    ("AttentionMapLogger", lambda: [AttentionMapLogger()], "validate", AttentionMapLogger().every_n_val_epochs),
    ("EvaluationReport (test: 200 bootstrap resamples + figures)", lambda: [EvaluationReport()], "test", None),
    ("PermutationImportance (test: 64 pixels x 5 repeats, 2 layers)",
     lambda: [PermutationImportance(layers=["blocks.0.attn", "blocks.1.attn"])], "test", None),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule()
    model = TinyTransformer()
    quiet_trainer(max_epochs=2).fit(model, datamodule=dm)  # a partly trained model (and warm-up)

    def epoch() -> float:
        L.seed_everything(0, verbose=False)
        trainer = quiet_trainer(max_epochs=1)
        start = time.perf_counter()
        trainer.fit(TinyTransformer(), datamodule=dm)
        return time.perf_counter() - start

    workdir = tempfile.TemporaryDirectory(prefix="lt_logging_cost_")  # artefacts are written (and then removed) here

    def evaluate(make: Callable[[], list[Any]], stage: str) -> float:
        trainer = quiet_trainer(callbacks=make(), default_root_dir=workdir.name)
        start = time.perf_counter()
        (trainer.validate if stage == "validate" else trainer.test)(model, datamodule=dm, verbose=False)
        return time.perf_counter() - start

    variants: dict[str, Callable[[], float]] = {"epoch": epoch}
    variants["bare validate"] = lambda: evaluate(lambda: [], "validate")
    variants["bare test"] = lambda: evaluate(lambda: [], "test")
    for name, make, stage, _ in VARIANTS:
        variants[name] = lambda make=make, stage=stage: evaluate(make, stage)
    results = side_by_side(variants, repeats=args.repeats)
    epoch_time = median(results["epoch"])
    rows = []
    for name, _, stage, every in VARIANTS:
        cost = max(0.0, median(results[name]) - median(results[f"bare {'validate' if stage == 'validate' else 'test'}"]))
        row: dict[str, Any] = {
            "callback": name,
            "s per event": cost,
            "event / epoch": cost / epoch_time,
            "default frequency": f"every {every} val epochs" if every else "test end only",
            "overhead at default": f"{100 * cost / (every * epoch_time):.1f}%" if every else "(once)",
        }
        rows.append(row)
    body = (
        f"TinyTransformer on digits (batch 64; one epoch = 20 training steps + validation on 270 samples), 1 torch "
        f"thread, {args.repeats} round-robin repeats, medians. Epoch time (bare Trainer, fit 1 epoch incl. validation): "
        f"{epoch_time:.3f} s. 'Event' = one logging event: the extra time of a validate/test call with the callback "
        "vs. without it. 'Overhead at default' = event cost / (every_n_val_epochs x epoch time).\n\n"
        + markdown_table(rows)
    )
    workdir.cleanup()
    record("logging_cost_eval_embed", "Cost of the evaluation report and interpretation loggers per event", body)


if __name__ == "__main__":
    main()
