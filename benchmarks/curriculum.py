"""Curriculum learning vs. plain shuffling on digits: optimizer steps to reach a target validation accuracy.

Difficulty comes from transfer scoring (Hacohen & Weinshall 2019): a teacher of the same architecture (a 3-layer
MLP, ``DeepMLP(depth=3)``) trained on the training set ranks the samples by its per-sample loss
(``CurriculumLearning(difficulty="teacher")``). For each seed the baseline and the curriculum runs are trained side
by side (round-robin) with the same model initialisation, validating every few steps. Run from the repository root: ``python -m benchmarks.curriculum``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import CurriculumLearning
from lightning_techniques.demo import DeepMLP, DigitsDataModule

TARGETS = (0.85, 0.90)
MAX_STEPS = 200
VAL_EVERY = 5
SEEDS = [0, 1, 2, 3, 4]
BATCH = 32
FULL_AT = 60
TEACHER_STEPS = 300


def make_model() -> L.LightningModule:
    return DeepMLP(depth=3, lr=0.05)  # SGD momentum 0.9


class ValCurve(Callback):
    """``(global_step, val_acc)`` after every validation."""

    def __init__(self) -> None:
        self.curve: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.curve.append((trainer.global_step, float(trainer.callback_metrics["val_acc"])))


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """First validated step at which ``val_acc >= target`` (None: never)."""
    return next((step for step, acc in curve if acc >= target), None)


def train_teacher(path: Path) -> None:
    L.seed_everything(100, verbose=False)
    teacher = make_model()
    quiet_trainer(max_steps=TEACHER_STEPS, limit_val_batches=0).fit(teacher, datamodule=DigitsDataModule(batch_size=64))
    torch.save({"state_dict": teacher.state_dict()}, path)


def run(seed: int, teacher: Path | None, balance: bool = True) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    curve = ValCurve()
    callbacks: list[Callback] = [curve]
    if teacher is not None:
        callbacks.append(CurriculumLearning(difficulty="teacher", teacher_checkpoint=str(teacher), pacing="root",
                                            start_fraction=0.3, full_at=FULL_AT, balance_classes=balance, seed=seed))
    trainer = quiet_trainer(max_steps=MAX_STEPS, val_check_interval=VAL_EVERY, check_val_every_n_epoch=None,
                            callbacks=callbacks)
    trainer.fit(make_model(), datamodule=DigitsDataModule(batch_size=BATCH, seed=0))
    return {"steps": {t: steps_to(curve.curve, t) for t in TARGETS}, "final": curve.curve[-1][1]}


def main() -> None:
    torch.set_num_threads(1)
    variants = {
        "baseline (shuffle)": (None, True),
        "curriculum (teacher, root, class-balanced)": ("teacher", True),
        "curriculum (teacher, root, unbalanced)": ("teacher", False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher.ckpt"
        train_teacher(teacher)
        seeds = {name: iter(SEEDS) for name in variants}

        def variant(name: str) -> Any:
            use, balance = variants[name]
            return lambda: run(next(seeds[name]), teacher if use else None, balance)

        results = side_by_side({name: variant(name) for name in variants}, repeats=len(SEEDS))
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"variant": name}
        for t in TARGETS:
            reached = [r["steps"][t] for r in runs if r["steps"][t] is not None]
            row[f"steps to val_acc>={t} per seed"] = ", ".join(
                str(r["steps"][t]) if r["steps"][t] is not None else f">{MAX_STEPS}" for r in runs)
            row[f"median steps to {t} (reached {len(reached)}/{len(runs)})"] = median(reached) if reached else float("nan")
        row[f"median val_acc at step {MAX_STEPS}"] = median([r["final"] for r in runs])
        rows.append(row)
    ratios = []
    for t in TARGETS:
        key = next(k for k in rows[0] if k.startswith(f"median steps to {t}"))
        key1 = next(k for k in rows[1] if k.startswith(f"median steps to {t}"))
        base, cur = rows[0][key], rows[1][key1]
        ratios.append(f"{t}: {cur / base:.3g}" if base == base and cur == cur and base > 0 else f"{t}: n/a")
    body = (
        f"`DeepMLP(depth=3)` (SGD lr 0.05, momentum 0.9) on digits, batch {BATCH}, validation every {VAL_EVERY} "
        f"steps, seeds {SEEDS}. Curriculum: `CurriculumLearning(difficulty=\"teacher\", pacing=\"root\", "
        f"start_fraction=0.3, full_at={FULL_AT})`; teacher = the same architecture trained {TEACHER_STEPS} steps "
        "(seed 100) on the training set. Same initialisation per seed in every variant; variants interleaved "
        "round-robin.\n\n"
        + markdown_table(rows)
        + "\n\nRatio of median steps to target, class-balanced curriculum / baseline (< 1: curriculum faster): "
        + ", ".join(ratios)
    )
    record("curriculum", "Curriculum learning: steps to target validation accuracy (digits)", body)


if __name__ == "__main__":
    main()
