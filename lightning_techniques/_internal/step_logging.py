"""Per-step scalar logging at the Trainer's ``log_every_n_steps`` cadence, shared by every step-wise technique.

A callback's ``pl_module.log`` call costs ~0.2 ms of CPU per key (Lightning's result collection), so a technique that
logs a scalar on every training step slows small models down measurably. Lightning itself only *writes* step
metrics to the loggers every ``log_every_n_steps`` stepping batches; :func:`should_log_step` is that same test, plus
the run's last training batch (so ``trainer.callback_metrics`` holds the final values after ``fit`` even for runs
shorter than the cadence). ``Trainer(log_every_n_steps=0)`` switches step logging off. On those steps
:func:`write_step_metrics` publishes the values where ``pl_module.log`` would (callback metrics, logged metrics, the
loggers at the batch's step) without going through the result collection: a dozen stacked techniques otherwise paid
several milliseconds on each logging step.

Every technique that logs takes one switch, ``log`` (:func:`check_log_flag`; renamed switches keep their old
names as deprecated aliases through :func:`resolve_log_flag`). Never keep the switch in an attribute named ``log`` or
``log_dict``: Lightning assigns the module's ``log``/``log_dict`` to every callback before ``setup``
(``_attach_model_logging_functions``), overwriting it - the techniques keep it as ``_log_enabled``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_techniques._internal import compat


def _is_last_training_batch(trainer: Any, loop: Any) -> bool:
    """True during the hooks of the batch that ends ``fit`` by ``max_steps`` or by ``max_epochs``."""
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps >= 0 and loop._batches_that_stepped + 1 >= max_steps:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    progress = loop.batch_progress
    batches = trainer.num_training_batches
    return bool(progress.is_last_batch) or (math.isfinite(batches) and progress.current.ready >= batches)


def should_log_step(trainer: Any) -> bool:
    """Whether a per-step scalar should be logged in the current training batch's hooks.

    True on the stepping batches where Lightning writes step metrics to the loggers (every ``log_every_n_steps``
    batches that step the optimizer, counted as Lightning counts them, so all micro-batches of such a step
    qualify), when the run is about to stop (``trainer.should_stop``), and on the run's last training batch
    (``max_steps`` / ``max_epochs``). False when ``log_every_n_steps`` is 0 or outside a fit loop.
    """
    every = getattr(trainer, "log_every_n_steps", 50)
    if not every:
        return False
    fit_loop = getattr(trainer, "fit_loop", None)
    loop = getattr(fit_loop, "epoch_loop", None)
    if loop is None or not hasattr(loop, "_batches_that_stepped"):
        return True  # not a Lightning Trainer (e.g. a stand-in in a unit test): log every time
    if (loop._batches_that_stepped + 1) % every == 0 or getattr(trainer, "should_stop", False):
        return True
    return _is_last_training_batch(trainer, loop)


def log_step_metrics(
    pl_module: Any,
    metrics: Mapping[str, float | Tensor] | Callable[[], Mapping[str, float | Tensor]],
) -> bool:
    """Log ``metrics`` (a mapping, or a function returning one, called only when logging) as step metrics when
    :func:`should_log_step` says so; returns True when it logged.

    Written where ``pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=False)`` would put them
    (:func:`write_step_metrics`) at a fraction of its cost: ``trainer.callback_metrics`` (so monitors and tests read
    them, with or without a logger) and, with a logger, ``trainer.logged_metrics`` and, on the batches where Lightning
    writes step metrics to the loggers, every logger's ``log_metrics`` at the step it writes them at."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or not should_log_step(trainer):
        return False
    write_step_metrics(trainer, pl_module, metrics() if callable(metrics) else metrics)
    return True


def write_step_metrics(trainer: Any, pl_module: Any, values: Mapping[str, float | Tensor],
                       to_loggers: bool = False) -> None:
    """Publish ``values`` (scalars: floats or one-element tensors) as this training batch's step metrics, now.

    ``LightningModule.log`` costs ~0.2 ms of CPU per key (its result collection moves and checks the metric object on
    every call: lightning 2.6, the logging table of ``benchmarks/overhead.py``), so a run stacking a dozen techniques
    paid milliseconds on every logging step. This writes what that call would make visible, directly, as Lightning's
    own ``LearningRateMonitor`` writes to the loggers: a 0-d tensor per key into ``trainer.callback_metrics`` (and
    ``trainer.logged_metrics`` when a logger is attached), and, on the batches where Lightning writes its step
    metrics to the loggers, the floats to each logger's ``log_metrics`` at the step it uses for them, then
    ``logger.save()``, as Lightning's logger connector does. Falls back to ``pl_module.log`` when this Lightning
    keeps its metrics elsewhere (``compat.step_metric_stores``). ``to_loggers=True`` writes to the loggers on this
    batch whatever the cadence (an event worth a row of its own, e.g. a step the GradScaler skipped)."""
    stores = compat.step_metric_stores(trainer)
    loggers = list(getattr(trainer, "loggers", None) or ())
    if stores is None:
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=False, logger=bool(loggers))
        return
    callback, logged, step = stores
    dtype = torch.get_default_dtype()
    tensors = {key: value.detach().reshape(()) if isinstance(value, Tensor) else torch.tensor(float(value), dtype=dtype)
               for key, value in values.items()}
    callback.update(tensors)
    if not loggers:
        return
    logged.update(tensors)
    if not (to_loggers or _lightning_writes_step_logs(trainer, step)):
        return  # e.g. the run's last batch off the cadence: Lightning would not write it to the loggers either
    scalars = {key: float(value) for key, value in tensors.items()}
    for logger in loggers:
        logger.log_metrics(scalars, step=step)
        logger.save()


def _lightning_writes_step_logs(trainer: Any, step: int) -> bool:
    """Whether Lightning writes this training batch's step metrics to the loggers (its logger connector's
    ``should_update_logs`` after the batch: every ``log_every_n_steps`` stepping batches, when the run stops, and every
    batch under ``fast_dev_run``)."""
    if getattr(trainer, "fast_dev_run", False):
        return True
    every = getattr(trainer, "log_every_n_steps", 50)
    return bool(every) and ((step + 1) % every == 0 or bool(getattr(trainer, "should_stop", False)))


def check_log_flag(name: str, value: Any) -> bool:
    """``value`` as the technique's logging switch; a clear ``TypeError`` naming the argument otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False (switches the technique's logging), got {value!r}.")
    return value


def resolve_log_flag(owner: str, log: bool | None, stacklevel: int = 3, **deprecated: Any) -> bool:
    """The logging switch of technique ``owner`` from ``log`` and its deprecated old names (``deprecated``: each
    old keyword argument's value, ``None`` when not passed). ``log=None`` (not passed) means ``True``.

    Passing an old name emits a ``FutureWarning`` naming the old and the new argument (``stacklevel`` points it at
    the caller of the technique's ``__init__``); passing it beside ``log`` (or two old names) raises a
    ``ValueError`` naming both; the value is validated by :func:`check_log_flag` under the name it was passed as.
    """
    given = [(name, value) for name, value in deprecated.items() if value is not None]
    if log is not None:
        given.insert(0, ("log", log))
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        old = " / ".join(name for name, _ in given if name != "log")
        raise ValueError(f"{owner}: got both {names} ({old}: the deprecated old name of log); pass log only.")
    if not given:
        return True
    name, value = given[0]
    if name != "log":
        warnings.warn(f"{owner}({name}=...) is deprecated and will be removed; use {owner}(log=...) instead.",
                      FutureWarning, stacklevel=stacklevel)
    return check_log_flag(name, value)
