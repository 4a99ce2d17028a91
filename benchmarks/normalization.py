"""Normalisation on breast-cancer's raw features, and the per-step overhead of the augmentation callbacks.

1. TabularMLP on breast-cancer (30 raw, unscaled features): no normalisation vs ZScoreNormalization vs
   MinMaxNormalization, same seeds, same number of steps; validation accuracy / loss afterwards.
2. DigitsCNN on digits: per-step wall time with InputNoise, ImageAugmentation, MixUp, CutMix, ZScoreNormalization
   vs. a bare Trainer (ratio of medians; variants interleaved round-robin).

Run from the repository root: ``python -m benchmarks.normalization``.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from benchmarks.runner import StepTimer, markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import (
    CutMix,
    ImageAugmentation,
    InputNoise,
    MinMaxNormalization,
    MixUp,
    ZScoreNormalization,
)
from lightning_techniques.demo import BreastCancerDataModule, DigitsCNN, DigitsDataModule, TabularMLP

SEEDS = (0, 1, 2)
TABULAR_STEPS = 100
OVERHEAD_STEPS = 60
OVERHEAD_REPEATS = 3
WARMUP = 5


class BatchIntervalTimer(StepTimer):
    """Wall time between consecutive ``on_train_batch_end`` calls: unlike :class:`StepTimer` (batch start -> end)
    it includes fetching, the device transfer and ``on_after_batch_transfer``, where batch transforms run."""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pass

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def tabular_variant(make_callbacks: Callable[[], list]) -> Callable[[], dict[str, float]]:
    seeds = iter(SEEDS)

    def run() -> dict[str, float]:
        seed = next(seeds)
        L.seed_everything(seed, verbose=False)
        module, dm, callbacks = TabularMLP(), BreastCancerDataModule(), make_callbacks()
        quiet_trainer(max_steps=TABULAR_STEPS, callbacks=callbacks, limit_val_batches=0).fit(module, datamodule=dm)
        out = quiet_trainer(callbacks=callbacks).validate(module, datamodule=dm, verbose=False)[0]
        return {"val_acc": float(out["val_acc"]), "val_loss": float(out["val_loss"])}

    return run


def overhead_variant(make_callbacks: Callable[[], list]) -> Callable[[], float]:
    def run() -> float:
        L.seed_everything(0, verbose=False)
        timer = BatchIntervalTimer()
        trainer = quiet_trainer(max_steps=OVERHEAD_STEPS, callbacks=[*make_callbacks(), timer], limit_val_batches=0)
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(batch_size=64))
        return median(timer.times[WARMUP:])

    return run


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    tabular = side_by_side(
        {
            "none (raw features)": tabular_variant(lambda: []),
            "ZScoreNormalization": tabular_variant(lambda: [ZScoreNormalization()]),
            "MinMaxNormalization": tabular_variant(lambda: [MinMaxNormalization()]),
        },
        repeats=len(SEEDS),
    )
    rows1 = []
    for name, runs in tabular.items():
        accs, losses = [r["val_acc"] for r in runs], [r["val_loss"] for r in runs]
        rows1.append({
            "normalisation": name,
            "val_acc mean": statistics.mean(accs),
            "val_acc min": min(accs),
            "val_acc per seed": ", ".join(f"{a:.3f}" for a in accs),
            "val_loss mean": statistics.mean(losses),
        })

    overhead = side_by_side(
        {
            "bare Trainer": overhead_variant(lambda: []),
            "InputNoise(gaussian, cosine)": overhead_variant(
                lambda: [InputNoise(scale=0.2, final_scale=0.0, schedule="cosine")]),
            "ImageAugmentation(rot 10, brightness/contrast 0.2)": overhead_variant(
                lambda: [ImageAugmentation(hflip_p=0.0, rotation_degrees=10, brightness=0.2, contrast=0.2)]),
            "MixUp(alpha=0.2)": overhead_variant(lambda: [MixUp(alpha=0.2)]),
            "CutMix(alpha=1.0)": overhead_variant(lambda: [CutMix()]),
            "ZScoreNormalization(per=channel)": overhead_variant(lambda: [ZScoreNormalization(per="channel")]),
        },
        repeats=OVERHEAD_REPEATS,
    )
    bare = median(overhead["bare Trainer"])
    rows2 = [{"callbacks": name, "median step (ms)": 1000 * median(times), "ratio vs bare": median(times) / bare}
             for name, times in overhead.items()]

    body = (
        f"TabularMLP (hidden 64, Adam lr 1e-3, batch 32) on breast-cancer's 30 raw features, {TABULAR_STEPS} steps, "
        f"seeds {list(SEEDS)}; validation split (114 samples) after training:\n\n"
        + markdown_table(rows1)
        + f"\n\nPer-step wall time on digits (DigitsCNN, batch 64, {OVERHEAD_STEPS} steps, first {WARMUP} dropped, "
        f"median of {OVERHEAD_REPEATS} interleaved runs; the interval between consecutive batch ends, so the batch "
        "transform is included):\n\n"
        + markdown_table(rows2)
    )
    record("normalization", "Normalisation (breast-cancer) and augmentation overhead (digits)", body)


if __name__ == "__main__":
    main()
