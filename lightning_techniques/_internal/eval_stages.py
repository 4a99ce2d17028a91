"""One routing of Lightning's validation/test hooks for callbacks that work during evaluation.

Evaluation reports, importance measures and embedding/attention loggers all do the same thing around Lightning's
eight evaluation hooks: start collecting when an epoch of a stage begins (if this epoch is due), look at each batch,
finish (compute, log) when the epoch ends, release whatever they attached (forward hooks) after the sanity check,
on an exception and at teardown, and count the validation epochs run during ``fit`` - in the checkpoint, so "every
N validation epochs" continues correctly after a resume. :class:`EvaluationCallback` does that once; a subclass
overrides the ``_start`` / ``_batch_start`` / ``_batch_end`` / ``_finish`` / ``_stop`` steps it needs.

Stages are ``"validate"`` and ``"test"``. The sanity check never counts and never reaches ``_finish``.

Callbacks that fetch samples of their own (attribution loggers take fixed samples by dataset index; SHAP takes a
background set) must see them exactly as the model does in that stage. :func:`batch_as_seen` /
:func:`fetch_samples` are the one way to do that: they run a collated batch through what Lightning's loops run
before ``*_step`` (``precision_plugin.convert_input``, ``on_before_batch_transfer``, the strategy's
``batch_to_device`` = ``transfer_batch_to_device`` + ``on_after_batch_transfer``, each on the module *or* the
datamodule as Lightning's own hook selector picks it, and so also every batch transform of this package, which wrap
``on_after_batch_transfer``), with ``trainer.state.stage`` set to that stage so hooks that branch on it
(``self.trainer.training``) take the right branch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import RunningStage
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_techniques._internal.lean_hooks import LeanHooks

_RUNNING_STAGE = {
    "train": RunningStage.TRAINING,
    "validate": RunningStage.VALIDATING,
    "test": RunningStage.TESTING,
    "predict": RunningStage.PREDICTING,
}


@contextmanager
def running_stage(trainer: Any, stage: str) -> Iterator[None]:
    """Inside the context ``trainer.state.stage`` is ``stage``'s ``RunningStage`` (restored afterwards)."""
    if stage not in _RUNNING_STAGE:
        raise ValueError(f"stage={stage!r} is invalid; choose one of {list(_RUNNING_STAGE)}.")
    before = trainer.state.stage
    trainer.state.stage = _RUNNING_STAGE[stage]
    try:
        yield
    finally:
        trainer.state.stage = before


def batch_as_seen(trainer: Any, batch: Any, stage: str, dataloader_idx: int = 0) -> Any:
    """``batch`` (as a DataLoader of ``stage`` yields it, on the CPU) turned into what ``*_step`` of ``stage``
    receives: Lightning's precision conversion, ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
    ``on_after_batch_transfer`` (module's or datamodule's, as Lightning picks; this package's batch transforms
    included), in that order, on the strategy's root device. No gradients are recorded. Call it on the rank that
    uses the result (no collective is involved)."""
    with running_stage(trainer, stage), torch.no_grad():
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
        return call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=dataloader_idx)


def fetch_samples(trainer: Any, dataset: Any, indices: Sequence[int], stage: str,
                  collate: Callable[[list[Any]], Any] | None = None, dataloader_idx: int = 0) -> tuple[Any, Any]:
    """``(raw, seen)``: samples ``dataset[i]`` collated by ``collate`` (the loader's ``collate_fn``; default
    ``default_collate``) - ``raw`` as the loader yields it (a copy: hooks that change a batch in place do not reach
    it), ``seen`` after :func:`batch_as_seen` (what the model is given in ``stage``)."""
    collate = collate or torch.utils.data.default_collate
    raw = collate([dataset[int(i)] for i in indices])
    copy = apply_to_collection(raw, torch.Tensor, torch.clone)
    return raw, batch_as_seen(trainer, copy, stage, dataloader_idx)


class EvaluationCallback(LeanHooks, Callback):
    """Base class: see the module docstring. Subclasses set ``self.every_n_val_epochs`` (0: never during fit)."""

    takes_over: frozenset[str] = frozenset({"eval_hooks"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    every_n_val_epochs: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.val_epochs_seen = 0

    def validation_due(self, trainer: Any) -> bool:
        """Whether the validation epoch now running is one this callback acts on: every ``every_n_val_epochs``-th
        during ``fit`` (counting from 1), always for ``trainer.validate``."""
        if trainer.state.fn != "fit":
            return True
        n = self.every_n_val_epochs
        return n > 0 and (self.val_epochs_seen + 1) % n == 0

    # ------------------------------------------------------------------ steps for subclasses
    def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """An epoch of ``stage`` begins (also during the sanity check: check ``trainer.sanity_checking``)."""

    def _batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Before ``validation_step`` / ``test_step`` of a batch."""

    def _batch_end(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int,
                   stage: str) -> None:
        """After ``validation_step`` / ``test_step`` of a batch."""

    def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """The epoch of ``stage`` ended (never for the sanity check; ``val_epochs_seen`` already counts it)."""

    def _stop(self) -> None:
        """Release whatever was attached (idempotent)."""

    # ------------------------------------------------------------------ Lightning hooks
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(trainer, pl_module, "validate")

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, batch, batch_idx, dataloader_idx, "validate")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            self._stop()
            return
        if trainer.state.fn == "fit":
            self.val_epochs_seen += 1
        self._finish(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, batch, batch_idx, dataloader_idx, "test")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, pl_module, "test")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop()

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs_seen": self.val_epochs_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_epochs_seen = int(state_dict.get("val_epochs_seen", 0))
