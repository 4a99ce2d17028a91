"""The logging switch, checked generically over the technique registry (issue #14, ARCHITECTURE.md section 3).

For every entry with a tiny-run recipe:

- no technique object keeps anything under an attribute Lightning assigns on callbacks (``log``, ``log_dict``:
  Lightning overwrites them with the module's before ``setup``);
- a technique whose run adds metric keys - to ``trainer.callback_metrics``, ``trainer.logged_metrics`` or the
  attached logger's ``log_metrics`` - compared with a bare run of the same recipe (same module, data, Trainer
  settings and companions, without the technique) takes a logging switch in its constructor (``log``;
  ``EvaluationReport``: ``log_scalars``), and built with the switch off (the recipe otherwise unchanged) its run adds
  none of them.

The runs are four optimizer steps (two validations for the recipes that validate), each bare run done once per
distinct recipe setting.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger
from test_contract import factories, quiet_trainer

from lightning_techniques import registry
from lightning_techniques.registry import Technique

# the documented logging switch of each technique whose switch is not called ``log``
SWITCH = {"EvaluationReport": "log_scalars"}
STEPS = 4  # two validations under the registry's EVAL_TRAINER (val_check_interval=2)
# techniques that take the switch but log no scalar in their tiny CPU run (anything else that takes a switch must log
# something there, so a technique that silently stopped logging is noticed)
NOTHING_IN_TINY_RUN = {
    "SmartMixedPrecision": "logs amp/* only under 16-mixed (fp16); its switch is tested in test_optim_precision",
    "SaliencyLogger": "no numeric summary (figures and arrays only); the switch is the shared AttributionLogger one",
    "SHAPLogger": "no numeric summary (figures and arrays only); the switch is the shared AttributionLogger one",
    "LIMELogger": "no numeric summary (figures and arrays only); the switch is the shared AttributionLogger one",
}

RUNNABLE = [entry for entry in registry.REGISTRY if entry.kind != "loss"]  # FocalLoss: a loss module, not a technique run


def _ids(entries: list[Technique]) -> list[str]:
    return [entry.name for entry in entries]


class RecordingLogger(Logger):
    """A logger that records what it receives - every ``log_metrics`` call as ``(step, metrics)``, the metric keys,
    the ``save`` calls - and nothing else."""

    def __init__(self, root: Path | str = ".") -> None:
        super().__init__()
        self._root = str(root)
        self.keys: set[str] = set()
        self.calls: list[tuple[int | None, dict[str, float]]] = []
        self.saves = 0

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._root

    @property
    def root_dir(self) -> str:
        return self._root

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.keys.update(metrics)
        self.calls.append((step, dict(metrics)))

    def save(self) -> None:
        self.saves += 1

    def steps_of(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every call that carried ``key``."""
        return [(step, metrics[key]) for step, metrics in self.calls if key in metrics]


def _run(entry: Technique, technique: bool, tmp_path: Path, **switch: Any) -> set[str]:
    """The metric keys of the entry's tiny run (callback metrics, logged metrics and what the logger received),
    with the technique built from the recipe (``switch`` overriding its arguments) or without it (bare)."""
    recipe = entry.recipe
    assert recipe is not None
    made = factories(entry)
    L.seed_everything(0, verbose=False)
    module, data = made["make_module"](), made["make_datamodule"]()
    callbacks = entry.companions()
    plugins = None
    if technique:
        if entry.kind == "plugin":
            plugins = [entry.build(**switch)]
        else:
            callbacks = [entry.build(**switch), *callbacks]
    logger = RecordingLogger(tmp_path)
    trainer = quiet_trainer(max_steps=STEPS, callbacks=callbacks, plugins=plugins, logger=logger,
                            default_root_dir=str(tmp_path), **recipe.trainer)
    trainer.fit(module, datamodule=data)
    return set(trainer.callback_metrics) | set(trainer.logged_metrics) | logger.keys


_BARE: dict[tuple[Any, ...], set[str]] = {}


def _bare_keys(entry: Technique, tmp_path: Path) -> set[str]:
    recipe = entry.recipe
    assert recipe is not None
    key = (recipe.module, repr(sorted(recipe.module_kwargs.items())), recipe.data,
           repr(sorted(recipe.data_kwargs.items())), repr(sorted(recipe.trainer.items())), recipe.with_)
    if key not in _BARE:
        _BARE[key] = _run(entry, False, tmp_path / "bare")
    return _BARE[key]


@pytest.mark.parametrize("entry", RUNNABLE, ids=_ids(RUNNABLE))
def test_nothing_stored_under_lightning_callback_attributes(entry: Technique) -> None:
    technique = entry.build()
    for name in ("log", "log_dict"):
        assert name not in vars(technique), (
            f"{entry.name} stores {name!r} on the instance: Lightning assigns the module's {name} to every callback "
            f"before setup, overwriting it (keep the switch as e.g. _log_enabled)")


@pytest.mark.parametrize("entry", RUNNABLE, ids=_ids(RUNNABLE))
def test_logging_switch_turns_off_everything_the_technique_logs(entry: Technique, tmp_path: Path) -> None:
    bare = _bare_keys(entry, tmp_path)
    added = _run(entry, True, tmp_path / "on") - bare
    switch = SWITCH.get(entry.name, "log")
    takes_switch = switch in inspect.signature(entry.cls.__init__).parameters
    if not added:  # nothing of its own reaches the metrics or the logger: no switch needed
        assert not takes_switch or entry.name in NOTHING_IN_TINY_RUN, (
            f"{entry.name} takes a {switch!r} switch but its run logged nothing of its own")
        return
    assert entry.name not in NOTHING_IN_TINY_RUN, f"{entry.name} logs {sorted(added)}: drop it from NOTHING_IN_TINY_RUN"
    assert takes_switch, f"{entry.name} logs {sorted(added)} but takes no {switch!r} switch"
    silent = _run(entry, True, tmp_path / "off", **{switch: False}) - bare
    assert not silent, f"{entry.name}({switch}=False) still logs {sorted(silent)}"
