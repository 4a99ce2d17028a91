"""``OptunaPruning``: report a monitored metric to an Optuna trial at every validation and stop unpromising runs.

Why not optuna-integration's ``PyTorchLightningPruningCallback``: it reports by *epoch* (a second validation in the
same epoch reports the same step, which Optuna ignores), under DDP it needs an RDB storage and a trial object on
every rank, only warns when the metric is missing (a typo silently disables pruning), and raises
``optuna.TrialPruned`` from inside ``fit`` in a single process but not under DDP. Here the trial lives on rank 0
only, the decision is broadcast so every rank stops at the same step, a run always ends the same way (``fit``
returns; :meth:`OptunaPruning.check_pruned` raises ``optuna.TrialPruned``), steps are global steps, and a resumed
run never reports a step twice.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.distributed import agree_any, broadcast_object
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice

try:  # at import time so that LightningCLI can resolve the annotations (a pruner's class_path in YAML)
    import optuna
except ImportError:  # the hpo extra is missing: constructing the callback names it
    optuna = None  # type: ignore[assignment]

Direction = Literal["minimize", "maximize"]
DIRECTIONS = ("minimize", "maximize")


def reported_steps(trial: Any) -> set[int]:
    """The steps an Optuna trial already holds intermediate values for (read from its study's storage; a retried
    trial that inherited its predecessor's values included)."""
    frozen = getattr(trial, "intermediate_values", None)  # a FrozenTrial
    if isinstance(frozen, dict):
        return {int(s) for s in frozen}
    study = getattr(trial, "study", None)
    if study is None:
        return set()
    for candidate in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if candidate.number == trial.number:
            return {int(s) for s in candidate.intermediate_values}
    return set()


class OptunaPruning(LeanHooks, Callback):
    """Reports ``monitor`` to an Optuna trial after every validation, keyed by the global step, and stops the run on
    every rank at once when the trial's pruner says so; :meth:`check_pruned` then raises ``optuna.TrialPruned``.

    Source: Akiba, Sano, Yanase, Ohta & Koyama 2019 (Optuna); the pruners it consults are Optuna's (median,
    successive halving - Jamieson & Talwalkar 2016, Hyperband - Li et al. 2018).

    Args:
        trial: the Optuna trial of this run, on rank 0. Other ranks may pass ``None`` (or anything: only rank 0's
            trial is used; its decision is broadcast). ``None`` on rank 0 gives the callback its own one-trial
            in-memory study with ``direction`` and ``pruner`` - e.g. ``optuna.pruners.ThresholdPruner(upper=5.0)``
            stops a diverging run; with the default pruner it only records the metric.
        monitor: the logged metric to report (``trainer.callback_metrics``). A name the module never logs is an
            error at the end of the first validation, naming the metrics that are logged.
        direction: ``"minimize"`` / ``"maximize"``, for the callback's own study only (a given trial's study has its
            own direction).
        pruner: an ``optuna.pruners.BasePruner`` for the callback's own study only (default: never prune).

    After ``fit``: ``pruned`` (bool), ``pruned_step`` and ``pruned_value`` say what happened on every rank;
    ``reported`` maps each reported global step to the value.

    Example::

        import optuna
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner())
        trial = study.ask()
        pruning = OptunaPruning(trial, monitor="val_acc")
        trainer = L.Trainer(max_epochs=5, callbacks=[pruning])
        trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule())
        try:
            pruning.check_pruned()
            study.tell(trial, float(trainer.callback_metrics["val_acc"]))
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    Limits: the pruner compares trials at equal global steps, so trials must validate at the same steps (the same
    batch size and ``val_check_interval``); a Trainer's ``min_epochs`` / ``min_steps`` keep a pruned run going until
    they are met (Lightning ignores ``should_stop`` before); the sanity check is never reported.
    """

    takes_over: frozenset[str] = frozenset({"stopping"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(
        self,
        trial: optuna.trial.Trial | None = None,
        monitor: str = "val_loss",
        direction: Direction = "minimize",
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        require("optuna", "hpo", "OptunaPruning")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged metric (a non-empty string), got {monitor!r}.")
        check_choice("direction", direction, DIRECTIONS)
        if trial is not None and not (callable(getattr(trial, "report", None))
                                      and callable(getattr(trial, "should_prune", None))):
            raise TypeError(f"trial must be an optuna.trial.Trial (or None on ranks other than 0), got "
                            f"{type(trial).__name__}.")
        if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(pruner).__name__}.")
        self.trial = trial
        self.monitor = monitor
        self.direction = direction
        self.pruner = pruner
        self._trial: Any = None
        self._stored: set[int] = set()
        self.reported: dict[int, float] = {}
        self.pruned = False
        self.pruned_step: int | None = None
        self.pruned_value: float | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_conflicts(trainer, self)
        if stage != "fit":
            return
        self.reported, self.pruned, self.pruned_step, self.pruned_value = {}, False, None, None
        self._trial, self._stored = None, set()
        if not trainer.is_global_zero:
            return
        if self.trial is None:
            study = optuna.create_study(direction=self.direction, pruner=self.pruner or optuna.pruners.NopPruner())
            self._trial = study.ask()
        else:
            self._trial = self.trial
            self._stored = reported_steps(self._trial)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if agree_any(trainer.strategy, self.monitor not in metrics):
            logged = ", ".join(sorted(metrics)) or "none"
            raise ValueError(
                f"OptunaPruning(monitor={self.monitor!r}): the run has not logged {self.monitor!r} by the end of "
                f"validation at global step {trainer.global_step}; the logged metrics are: {logged}. Pass one of "
                f"them as monitor, or log {self.monitor!r} with self.log(...) in the module."
            )
        step = int(trainer.global_step)
        decision: tuple[bool, float | None] = (False, None)
        if trainer.is_global_zero:
            value = float(metrics[self.monitor])
            report = step not in self.reported and step not in self._stored
            if report:
                # NaN is reported as is: Optuna's pruners prune a NaN intermediate value
                self._trial.report(value, step)
            decision = (bool(self._trial.should_prune()), value if report else None)
        prune, value_reported = broadcast_object(trainer.strategy, decision)
        if value_reported is not None:
            self.reported[step] = value_reported
        if prune:
            self.pruned = True
            self.pruned_step = step
            self.pruned_value = value_reported if value_reported is not None else self.reported.get(step)
            trainer.should_stop = True

    def check_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` when the last ``fit`` was pruned (call it after ``fit``, on rank 0 at least)."""
        if not self.pruned:
            return
        shown = "nan" if self.pruned_value is None or math.isnan(self.pruned_value) else f"{self.pruned_value:.6g}"
        raise optuna.TrialPruned(f"pruned at global step {self.pruned_step} ({self.monitor}={shown})")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "reported": {int(k): float(v) for k, v in self.reported.items()},
            "pruned": self.pruned,
            "pruned_step": self.pruned_step,
            "pruned_value": self.pruned_value,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = {int(k): float(v) for k, v in state_dict.get("reported", {}).items()}
        self.pruned = bool(state_dict.get("pruned", False))
        self.pruned_step = state_dict.get("pruned_step")
        self.pruned_value = state_dict.get("pruned_value")
