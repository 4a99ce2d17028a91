"""``lightning-techniques``: Lightning's own LightningCLI over the demo models and datamodules.

    lightning-techniques fit --config configs/digits.yaml

Techniques are named in YAML under ``trainer.callbacks`` (``class_path`` / ``init_args``). After ``fit`` the CLI
tests the trained model and prints the test accuracy and where the logs and figures are.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_techniques._internal.artifacts import artifact_dir


class TechniquesCLI(LightningCLI):
    """LightningCLI whose ``fit`` ends with a test run and a short report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero:
            return
        metrics = results[0] if results else {}
        accuracy = metrics.get("test_acc")
        print()
        if accuracy is not None:
            print(f"Test accuracy: {float(accuracy):.4f}")
        else:
            print(f"Test metrics: {metrics}")
        print(f"Logs: {trainer.log_dir or trainer.default_root_dir}")
        print(f"Figures and tables: {artifact_dir(trainer)}")
        sys.stdout.flush()


def main(args: list[str] | None = None) -> None:
    """Console-script entry point."""
    TechniquesCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
