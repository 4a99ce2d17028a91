"""What the demo CLI shows after a run: a line per epoch, learning curves, the LSUV variance figure.

:class:`TrainingHistory` is an ordinary callback that records the per-epoch means the module logs (``train_loss`` from
the loss ``training_step`` returns, ``train_acc``, ``val_loss`` and ``val_acc`` from ``trainer.callback_metrics``),
prints one line per epoch, and checkpoints its history (a resumed run draws the whole curve).
:func:`write_run_figures` draws the figures through the shared artefact logging (PNG files in the run's artefact
directory, TensorBoard / MLflow / W&B when attached).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques._internal.artifacts import ArtifactLogger

_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class TrainingHistory(Callback):
    """Per-epoch training history (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``), printed as one line per
    epoch when ``print_epochs`` (rank 0 only), and kept in ``self.history`` (a list of dicts, one per epoch).

    ``train_loss`` is the mean of the losses ``training_step`` returned over the epoch; the other values are what the
    module logged (``train_acc`` as an epoch mean). A missing value is recorded as ``nan``.
    """

    def __init__(self, print_epochs: bool = True, stream: Any = None) -> None:
        self.print_epochs = print_epochs
        self.stream = stream
        self.history: list[dict[str, float]] = []
        self._losses: list[float] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._losses = []
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = _scalar(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if value is not None:
            self._losses.append(value)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = trainer.callback_metrics
        row: dict[str, float] = {"epoch": float(trainer.current_epoch)}
        row["train_loss"] = sum(self._losses) / len(self._losses) if self._losses else math.nan
        for key in _KEYS[1:]:
            value = _scalar(metrics.get(key))
            row[key] = math.nan if value is None else value
        row["seconds"] = time.perf_counter() - self._started
        self.history.append(row)
        if self.print_epochs and trainer.is_global_zero:
            total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            parts = [f"epoch {int(row['epoch']):>3}/{total}"]
            parts += [f"{key} {row[key]:.4f}" for key in _KEYS if not math.isnan(row[key])]
            parts.append(f"{row['seconds']:.1f} s")
            print("  ".join(parts), file=self.stream or sys.stdout, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]


def restored_epoch(trainer: Any) -> int | None:
    """The epoch whose weights an early-stopping callback restored at the end of ``fit`` (None when none did)."""
    for callback in trainer.callbacks:
        if getattr(callback, "restored", False) and getattr(callback, "best_epoch", -1) >= 0:
            return int(callback.best_epoch)
    return None


def lsuv_report(trainer: Any) -> list[dict[str, Any]]:
    """The per-layer report of an ``LSUVInit`` callback of ``trainer`` (empty when there is none)."""
    for callback in trainer.callbacks:
        report = getattr(callback, "report", None)
        if type(callback).__name__ == "LSUVInit" and report:
            return list(report)
    return []


def learning_curves_figure(history: list[dict[str, float]], best_epoch: int | None = None) -> Any:
    """Loss and accuracy per epoch (train and validation), the restored epoch marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4))
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [int(row["epoch"]) for row in history]
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        for stage, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{stage}_{metric}", math.nan) for row in history]
            if any(not math.isnan(v) for v in values):
                ax.plot(epochs, values, style, ms=3, label=f"{stage}_{metric}")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"restored (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    loss_ax.set_yscale("log")
    loss_ax.set_title("loss (log scale)", fontsize=10)
    acc_ax.set_title("accuracy", fontsize=10)
    figure.tight_layout()
    return figure


def lsuv_figure(report: list[dict[str, Any]]) -> Any:
    """Output variance of each LSUV layer on the first batch, before and after the scaling (log scale)."""
    from matplotlib.figure import Figure

    layers = [str(row["layer"]) for row in report]
    before = [float(row["variance_before"]) for row in report]
    after = [float(row["variance_after"]) for row in report]
    figure = Figure(figsize=(max(5.0, 0.55 * len(layers) + 2), 3.4))
    ax = figure.subplots()
    positions = range(len(layers))
    ax.bar([p - 0.2 for p in positions], before, width=0.4, label="before LSUV")
    ax.bar([p + 0.2 for p in positions], after, width=0.4, label="after LSUV")
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="target variance 1")
    ax.set_yscale("log")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("output variance (first batch)")
    ax.set_title("LSUVInit: per-layer output variance", fontsize=10)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    figure.tight_layout()
    return figure


def write_run_figures(trainer: Any, history: TrainingHistory | None) -> list[Path]:
    """Write the learning curves (when ``history`` has epochs) and the LSUV figure (when the run used ``LSUVInit``)
    as PNG artefacts of ``trainer``'s run; returns the files written (none on ranks other than 0)."""
    if not trainer.is_global_zero:
        return []
    logger = ArtifactLogger(trainer)
    written: list[Path] = []
    if history is not None and history.history:
        path = logger.log_figure("learning_curves", learning_curves_figure(history.history, restored_epoch(trainer)),
                                 close=False)
        written += [path] if path else []
    report = lsuv_report(trainer)
    if report:
        path = logger.log_figure("lsuv/variance", lsuv_figure(report), step=0, close=False)
        written += [path] if path else []
    return written
