"""``lightning_techniques.mechanisms``: the documented module for technique authors exports every shared mechanism,
and its docstring example (a loss term in a few lines) works on a stock Trainer and leaves the module as it was."""

from __future__ import annotations

import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_techniques import _internal, mechanisms
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.testing import module_fingerprint


def test_every_internal_mechanism_is_exported() -> None:
    assert set(_internal.__all__) <= set(mechanisms.__all__)
    for name in ("interpolate", "progress", "log_step_metrics", "check_conflicts", "add_loss_term"):
        assert callable(getattr(mechanisms, name))


def test_docstring_example_adds_the_term_and_cleans_up() -> None:
    example = re.search(r"Example.*?::\n\n(.*?)\n\nThe names", mechanisms.__doc__ or "", flags=re.S)
    assert example, "the module docstring has an example"
    namespace: dict[str, Any] = {}
    exec(compile(re.sub(r"^    ", "", example.group(1), flags=re.M), "mechanisms.py", "exec"), namespace)

    class Probe(Callback):
        terms: list[list[str]] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.terms.append(mechanisms.registered_loss_terms(pl_module))

    module, probe = DigitsCNN(channels=4), Probe()
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, limit_val_batches=0)
    L.seed_everything(0, verbose=False)
    L.Trainer(max_steps=2, callbacks=[namespace["TinyL2"](), probe], **quiet).fit(module, DigitsDataModule())
    assert probe.terms == [["tiny_l2"], ["tiny_l2"]]
    clean = DigitsCNN(channels=4)
    L.seed_everything(0, verbose=False)
    L.Trainer(max_steps=2, **quiet).fit(clean, DigitsDataModule())
    assert module_fingerprint(module) == module_fingerprint(clean)
