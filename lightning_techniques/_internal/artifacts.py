"""Logging artefacts (images, figures, tables, arrays, text) to whatever logger the Trainer has.

Every artefact is written as a file under the run's artefact directory (:func:`artifact_dir`): the first attached
logger's ``log_dir`` (CSVLogger, TensorBoardLogger) or ``save_dir``, else ``trainer.default_root_dir``, plus
``artifacts/``. Files are written atomically (temporary name, then rename) and only on global rank 0. In addition:

* TensorBoard: ``add_image`` / ``add_figure`` / ``add_text`` (tables as Markdown text);
* MLflow: the written file is uploaded with ``log_artifact``;
* Weights & Biases: images and figures as ``wandb.Image``, tables as ``wandb.Table``.

PNG files are encoded with the standard library (no Pillow/matplotlib needed for images); figures need matplotlib.
"""

from __future__ import annotations

import csv
import io
import os
import re
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _safe(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.\-/]+", "_", name).strip("/")
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"Artefact name {name!r} has no usable characters.")
    return "/".join(parts)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename, so no half-written file is ever visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def to_uint8_image(image: Any) -> np.ndarray:
    """HxW, HxWxC or CxHxW (C in 1, 3, 4) array/tensor -> HxWxC uint8; floats are min-max scaled to [0, 255]."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"An image must be HxW, HxWxC or CxHxW with C in (1, 3, 4); got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.nan_to_num(arr * 255.0).round().clip(0, 255).astype(np.uint8)
    return arr


def encode_png(image: Any) -> bytes:
    """PNG bytes of an image (see :func:`to_uint8_image`), with the standard library only."""
    arr = to_uint8_image(image)
    height, width, channels = arr.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def artifact_dir(trainer: Any) -> Path:
    """Where this run's artefact files go (see the module docstring)."""
    for logger in getattr(trainer, "loggers", []) or []:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory:
            return Path(directory) / "artifacts"
    return Path(trainer.default_root_dir) / "artifacts"


def _rows(table: Any) -> tuple[list[str], list[list[Any]]]:
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
        columns = [str(c) for c in table.columns]
        return columns, table.astype(object).values.tolist()
    if isinstance(table, Mapping):  # {column: values}
        columns = [str(c) for c in table]
        values = [list(v) for v in table.values()]
        return columns, [list(r) for r in zip(*values)]
    rows = list(table)
    if rows and isinstance(rows[0], Mapping):
        columns = list(dict.fromkeys(str(k) for row in rows for k in row))
        return columns, [[row.get(c, "") for c in columns] for row in rows]
    raise TypeError("A table must be a DataFrame, a {column: values} mapping or a list of row dicts.")


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def table_to_markdown(table: Any) -> str:
    """A Markdown rendering of a table (same inputs as :meth:`ArtifactLogger.log_table`)."""
    columns, rows = _rows(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class ArtifactLogger:
    """Writes artefacts for ``trainer`` (see the module docstring). Methods return the file written, or None on
    ranks other than 0."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def directory(self) -> Path:
        return artifact_dir(self.trainer)

    def _enabled(self) -> bool:
        return bool(getattr(self.trainer, "is_global_zero", True))

    def _step(self, step: int | None) -> int:
        return int(self.trainer.global_step if step is None else step)

    def _path(self, name: str, step: int, suffix: str, latest: bool = False) -> Path:
        # latest=True: one file per name, replaced by each call (a "latest" set instead of one file per step)
        return self.directory / (f"{_safe(name)}_latest{suffix}" if latest else f"{_safe(name)}_step{step:07d}{suffix}")

    def _loggers(self, kind: str) -> list[Any]:
        found = []
        for logger in getattr(self.trainer, "loggers", []) or []:
            module = type(logger).__module__ + "." + type(logger).__name__
            if kind in module.lower():
                found.append(logger)
        return found

    def _mlflow_upload(self, path: Path, name: str) -> None:
        for logger in self._loggers("mlflow"):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=str(Path(_safe(name)).parent))

    def log_image(self, name: str, image: Any, step: int | None = None, latest: bool = False) -> Path | None:
        """An image (HxW, HxWxC or CxHxW; floats min-max scaled) as PNG (``latest``: ``<name>_latest.png``,
        replaced each call, instead of one file per step; attached loggers still get the step)."""
        if not self._enabled():
            return None
        step = self._step(step)
        arr = to_uint8_image(image)
        path = atomic_write_bytes(self._path(name, step, ".png", latest), encode_png(arr))
        for logger in self._loggers("tensorboard"):
            logger.experiment.add_image(name, arr, step, dataformats="HWC")
        for logger in self._loggers("wandb"):
            import wandb

            logger.experiment.log({name: wandb.Image(arr), "trainer/global_step": step})
        self._mlflow_upload(path, name)
        return path

    def log_figure(self, name: str, figure: Any, step: int | None = None, close: bool = True,
                   latest: bool = False) -> Path | None:
        """A matplotlib figure as PNG (closed afterwards unless ``close=False``; ``latest`` as for
        :meth:`log_image`)."""
        if not self._enabled():
            return None
        step = self._step(step)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        path = atomic_write_bytes(self._path(name, step, ".png", latest), buffer.getvalue())
        for logger in self._loggers("tensorboard"):
            logger.experiment.add_figure(name, figure, step, close=False)
        for logger in self._loggers("wandb"):
            import wandb

            logger.experiment.log({name: wandb.Image(figure), "trainer/global_step": step})
        self._mlflow_upload(path, name)
        if close:
            import matplotlib.pyplot as plt

            plt.close(figure)
        return path

    def log_table(self, name: str, table: Any, step: int | None = None, latest: bool = False) -> Path | None:
        """A table (DataFrame, ``{column: values}`` or list of row dicts) as CSV, plus a Markdown copy (``latest``
        as for :meth:`log_image`)."""
        if not self._enabled():
            return None
        step = self._step(step)
        columns, rows = _rows(table)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(columns)
        writer.writerows([[_fmt(v) for v in row] for row in rows])
        path = atomic_write_bytes(self._path(name, step, ".csv", latest), text.getvalue().encode())
        markdown = table_to_markdown(table)
        atomic_write_bytes(self._path(name, step, ".md", latest), markdown.encode())
        for logger in self._loggers("tensorboard"):
            logger.experiment.add_text(name, markdown, step)
        for logger in self._loggers("wandb"):
            import wandb

            logger.experiment.log({name: wandb.Table(columns=columns, data=rows), "trainer/global_step": step})
        self._mlflow_upload(path, name)
        return path

    def log_array(self, name: str, array: Any, step: int | None = None, latest: bool = False) -> Path | None:
        """A raw array/tensor as ``.npy`` (files only; loggers get images/figures/tables; ``latest`` as for
        :meth:`log_image`)."""
        if not self._enabled():
            return None
        step = self._step(step)
        arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        buffer = io.BytesIO()
        np.save(buffer, arr, allow_pickle=False)
        path = atomic_write_bytes(self._path(name, step, ".npy", latest), buffer.getvalue())
        self._mlflow_upload(path, name)
        return path

    def log_text(self, name: str, text: str, step: int | None = None) -> Path | None:
        """Plain text as ``.txt`` (and TensorBoard text)."""
        if not self._enabled():
            return None
        step = self._step(step)
        path = atomic_write_bytes(self._path(name, step, ".txt"), text.encode())
        for logger in self._loggers("tensorboard"):
            logger.experiment.add_text(name, text, step)
        self._mlflow_upload(path, name)
        return path

