"""``lightning-techniques``: Lightning's own LightningCLI over the demo models and datamodules.

    lightning-techniques fit --config configs/digits.yaml
    lightning-techniques search --config configs/search/digits.yaml --space configs/search/digits_space.yaml

``search`` runs an Optuna hyperparameter search over a config like ``fit``'s (``--help`` lists its options; see
:mod:`lightning_techniques.search.optuna_search`).

Techniques are named in YAML under ``trainer.callbacks`` (``class_path`` / ``init_args``). On top of a plain
LightningCLI, ``fit``:

* sets torch's CPU thread count from ``torch_threads`` (a top-level key of the config, or ``--torch_threads N``;
  unset: torch's default, one thread per core, unless ``OMP_NUM_THREADS`` says otherwise) and says what it is.
  Small models train fastest on one thread: with more, the threads spend longer synchronising than computing,
  and on a busy machine much longer;
* prints one line per epoch (when the progress bar is off) and hides Lightning's advertising "Tip" messages;
* after training writes the learning curves (train/val loss and accuracy, the epoch whose weights early stopping
  restored marked) and, with ``LSUVInit``, the per-layer variance before/after; saves the model it is about to test
  as ``tested.ckpt``; tests it; and prints the test accuracy and the paths of the files a user wants.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_techniques._internal.artifacts import artifact_dir
from lightning_techniques.demo.run_report import TrainingHistory, restored_epoch, write_run_figures

TESTED_CHECKPOINT = "tested.ckpt"


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." advertisements (information, not about the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless" not in str(record.msg)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    # lightning 2.6's own pytree helper calls a torch API that torch >= 2.9 deprecates: nothing a user can change
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class TechniquesCLI(LightningCLI):
    """LightningCLI whose ``fit`` sets the thread count, prints a line per epoch, and ends with figures, the saved
    tested model, a test run and a short report (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self.history: TrainingHistory | None = None
        self.tested_checkpoint: Path | None = None
        self.figures: list[Path] = []
        _quiet_lightning()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="CPU threads torch uses (torch.set_num_threads); unset: torch's default. Small models: 1.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads must be >= 1, got {threads}.")
            torch.set_num_threads(int(threads))
            source = "torch_threads in the config"
        elif os.environ.get("OMP_NUM_THREADS"):
            source = "OMP_NUM_THREADS"
        else:
            source = "torch's default, one per core; set torch_threads to change it"
        if self.subcommand in ("fit", "validate", "test", "predict") and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"torch CPU threads: {torch.get_num_threads()} ({source})", flush=True)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        self.history = TrainingHistory(print_epochs=trainer.progress_bar_callback is None)
        trainer.callbacks.append(self.history)  # type: ignore[attr-defined]  # set in Trainer.__init__ by its callback connector; lightning's Trainer does not declare it
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        self.figures = write_run_figures(trainer, self.history)
        # The model in memory is the one about to be tested (with EarlyStopping(restore_best_weights=True): the best
        # epoch's weights, not the last epoch's that ModelCheckpoint saved). Save it under its own name.
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            directory = Path(checkpoint.dirpath)
        self.tested_checkpoint = directory / TESTED_CHECKPOINT
        trainer.save_checkpoint(self.tested_checkpoint, weights_only=True)  # collective under DDP; rank 0 writes
        results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero:
            return
        metrics = results[0] if results else {}
        accuracy = metrics.get("test_acc")
        best = restored_epoch(trainer)
        print()
        if accuracy is not None:
            print(f"Test accuracy: {float(accuracy):.4f}")
        else:
            print(f"Test metrics: {metrics}")
        weights = f"the weights of epoch {best}, restored by early stopping" if best is not None else "the final weights"
        print(f"Tested model ({weights}): {self.tested_checkpoint}")
        if checkpoint is not None and checkpoint.last_model_path:
            print(f"Last-epoch checkpoint (to resume training with --ckpt_path): {checkpoint.last_model_path}")
        elif checkpoint is not None and checkpoint.best_model_path:
            kind = "Last-epoch checkpoint" if checkpoint.monitor is None else f"Best checkpoint by {checkpoint.monitor}"
            print(f"{kind} (to resume training with --ckpt_path): {checkpoint.best_model_path}")
        print(f"Logs: {trainer.log_dir or trainer.default_root_dir}")
        out = artifact_dir(trainer)
        figures = sorted(out.rglob("*.png")) if out.is_dir() else []
        if figures:
            print("Figures:")
            for path in figures:
                print(f"  {path}")
        print(f"Figures and tables: {out}")
        sys.stdout.flush()


def main(args: list[str] | None = None) -> None:
    """Console-script entry point (``search``: the Optuna search, :mod:`lightning_techniques.search`)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["search"]:
        from lightning_techniques.search.optuna_search import search_main

        search_main(argv[1:])
        return
    TechniquesCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
