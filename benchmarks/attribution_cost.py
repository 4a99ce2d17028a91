"""Cost of the attribution loggers: seconds per logging event vs. the training epoch time on the demo.

    python -m benchmarks.attribution_cost [--epochs 2] [--repeats 2]

DigitsCNN (default size) on digits (batch 64, 1 intra-op thread), default arguments of every logger (10 samples, one
per class). A baseline fit without logger and one fit per logger (logging after every validation epoch) are run
round-robin in one process. Reported per method: median seconds per logging event (timed around the event itself),
the median training-epoch time of the baseline, the overhead if it logged every epoch, and the overhead at the
method's default ``every_n_epochs`` (the issue's budget: < 10% of training time).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import (
    DeepLiftLogger,
    GradCAMLogger,
    IntegratedGradientsLogger,
    LIMELogger,
    SaliencyLogger,
    SHAPLogger,
)
from lightning_techniques.demo import DigitsCNN, DigitsDataModule

METHODS = {
    "SaliencyLogger": SaliencyLogger,
    "IntegratedGradientsLogger": IntegratedGradientsLogger,
    "DeepLiftLogger": DeepLiftLogger,
    "GradCAMLogger": GradCAMLogger,
    "SHAPLogger": SHAPLogger,
    "LIMELogger": LIMELogger,
}


class EpochTimer(Callback):
    """Wall time of each training epoch (train batches only, validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self._start)


def timed(cls: type) -> Any:
    """The logger class with every logging event timed (``self.event_times``), logging every validation epoch."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        def log_event(self, trainer: Any, stage: str) -> dict[str, Any]:
            start = time.perf_counter()
            out = super().log_event(trainer, stage)
            self.event_times.append(time.perf_counter() - start)
            return out

    logger = Timed(every_n_epochs=1)
    logger.event_times = []
    return logger


def fit(method: str | None, epochs: int, root: str) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    epoch_timer = EpochTimer()
    callbacks: list[Callback] = [epoch_timer]
    logger = timed(METHODS[method]) if method else None
    if logger is not None:
        callbacks.append(logger)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=root)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
    return {"epoch": epoch_timer.times, "events": logger.event_times if logger else []}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    import tempfile

    root = tempfile.mkdtemp()
    variants = {"baseline": lambda: fit(None, args.epochs, root)}
    variants.update({m: (lambda m=m: fit(m, args.epochs, root)) for m in METHODS})
    results = side_by_side(variants, repeats=args.repeats)
    epoch = median([t for run in results["baseline"] for t in run["epoch"]])
    rows = []
    for method, cls in METHODS.items():
        events = [t for run in results[method] for t in run["events"]]
        per_event = median(events)
        default_every = cls().every_n_epochs
        rows.append({
            "logger": method,
            "s / event": per_event,
            "train epoch s (baseline)": epoch,
            "overhead if every epoch": f"{100 * per_event / epoch:.1f}%",
            "default every_n_epochs": default_every,
            "overhead at default": f"{100 * per_event / (default_every * epoch):.1f}%",
            "events timed": len(events),
        })
    body = (
        f"DigitsCNN(channels=32) on digits (1,257 training images, batch 64, 20 steps/epoch), 1 intra-op thread, "
        f"{args.epochs} epochs x {args.repeats} repeats per variant, round-robin. Every logger with its default "
        "arguments (10 samples: one per class; IG 50 steps; SHAP GradientExplainer, 64 background images, 200 "
        "samples; LIME 2x2 superpixels, 200 perturbations) but logging every epoch; 's / event' is the median wall time "
        "of one logging event (sample fetch, attribution, PNG/npy/csv writing); the epoch time is the baseline's "
        "median training epoch (validation excluded).\n\n"
        + markdown_table(rows)
    )
    record("logging_cost_attrib", "Attribution loggers: seconds per logging event vs. epoch time", body)


if __name__ == "__main__":
    main()
