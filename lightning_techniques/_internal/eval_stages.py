"""One routing of Lightning's validation/test hooks for callbacks that work during evaluation.

Evaluation reports, importance measures and embedding/attention loggers all do the same thing around Lightning's
eight evaluation hooks: start collecting when an epoch of a stage begins (if this epoch is due), look at each batch,
finish (compute, log) when the epoch ends, release whatever they attached (forward hooks) after the sanity check,
on an exception and at teardown, and count the validation epochs run during ``fit`` - in the checkpoint, so "every
N validation epochs" continues correctly after a resume. :class:`EvaluationCallback` does that once; a subclass
overrides the ``_start`` / ``_batch_start`` / ``_batch_end`` / ``_finish`` / ``_stop`` steps it needs.

Stages are ``"validate"`` and ``"test"``. The sanity check never counts and never reaches ``_finish``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback


class EvaluationCallback(Callback):
    """Base class: see the module docstring. Subclasses set ``self.every_n_val_epochs`` (0: never during fit)."""

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
