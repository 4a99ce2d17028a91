"""Declared conflicts between techniques, refused in ``setup`` before any training step.

Every technique class states two class attributes:

* ``takes_over: frozenset[str]`` - the mechanisms and hooks it takes over, from :data:`MECHANISMS`;
* ``conflicts_with: tuple[str, ...]`` - class names of techniques (or Lightning callbacks) it cannot run with.

An *instance* may narrow or widen ``conflicts_with`` (``OptimizerCallback("lbfgs")`` conflicts with gradient
accumulation and clipping, other optimizers do not); the class attribute is what a registry lists.

:func:`check_conflicts` is the one setup-time check every technique calls first in ``setup(stage="fit")``. It
refuses, with a ``ValueError`` naming both parties:

1. a pair where either side names the other in its ``conflicts_with`` (so one side's declaration is enough);
2. two callbacks that take over the same *exclusive* mechanism (:data:`EXCLUSIVE`) - only one technique can own the
   train sampler, the accumulation factor or the LR of the run's optimizer; Lightning's own callbacks count with
   what they take over (:data:`LIGHTNING_CALLBACKS`);
3. a technique that takes over ``"accumulation"`` on a Trainer built with ``accumulate_grad_batches > 1``.

Because the check runs in each technique's ``setup`` against *all* callbacks of the Trainer, it fires in the first
``setup`` of a conflicting pair, whatever their order in ``callbacks``; Lightning then calls ``on_exception`` on
every callback, so nothing the earlier ones installed stays behind.
"""

from __future__ import annotations

from typing import Any

#: The vocabulary of ``takes_over``.
MECHANISMS: frozenset[str] = frozenset({
    "configure_optimizers",  # wraps the module's configure_optimizers (composed: several may)
    "train_sampler",  # decides which samples the train loader yields
    "batch_transform",  # transforms the on-device batch (on_after_batch_transfer)
    "criterion",  # reconfigures or replaces the module's loss-module attribute
    "loss_term",  # adds a term to the loss training_step returns
    "precision",  # changes the numeric precision of the run or of layers
    "optimizer_step",  # acts around / instead of the optimizer step (skips, closures)
    "gradients",  # reads or changes gradients before the step (clipping, guards)
    "lr",  # sets the learning rate of the run's optimizers over time
    "accumulation",  # sets trainer.accumulate_grad_batches
    "eval_hooks",  # works during validation / test / predict
    "weights_init",  # overwrites the initial weights
    "stopping",  # decides when the run stops
})

#: Mechanisms only one callback of a run may take over.
EXCLUSIVE: frozenset[str] = frozenset({"train_sampler", "accumulation", "lr"})

#: Lightning's own callbacks that take over an exclusive mechanism (by class name, with what they take over).
LIGHTNING_CALLBACKS: dict[str, frozenset[str]] = {
    "GradientAccumulationScheduler": frozenset({"accumulation"}),
    "StochasticWeightAveraging": frozenset({"lr"}),  # swaps the run's schedulers for SWALR at swa_epoch_start
}


def _name(obj: Any) -> str:
    return type(obj).__name__


def takes_over(callback: Any) -> frozenset[str]:
    """What ``callback`` takes over: its ``takes_over`` attribute, or the entry of a Lightning callback."""
    declared = getattr(callback, "takes_over", None)
    if declared is not None:
        return frozenset(declared)
    from lightning.pytorch import callbacks as lightning_callbacks

    for name, mechanisms in LIGHTNING_CALLBACKS.items():
        cls = getattr(lightning_callbacks, name, None)
        if cls is not None and isinstance(callback, cls):
            return mechanisms
    return frozenset()


def conflicts_of(callback: Any) -> tuple[str, ...]:
    return tuple(getattr(callback, "conflicts_with", ()) or ())


def _declared(a: Any, b: Any) -> bool:
    """Whether ``a`` names ``b`` (its class or a base class) in ``conflicts_with``."""
    names = set(conflicts_of(a))
    return bool(names) and any(cls.__name__ in names for cls in type(b).__mro__)


def check_conflicts(trainer: Any, technique: Any) -> None:
    """Raise ``ValueError`` when ``technique`` cannot run with another callback of ``trainer`` or with its settings
    (see the module docstring). Call it first in ``setup(stage="fit")``."""
    mine = takes_over(technique)
    unknown = sorted(mine - MECHANISMS)
    if unknown:
        raise ValueError(f"{_name(technique)}.takes_over names unknown mechanisms {unknown}; "
                         f"allowed: {sorted(MECHANISMS)}.")
    for other in getattr(trainer, "callbacks", []):
        if other is technique:
            continue
        if _declared(technique, other) or _declared(other, technique):
            reason = _reason(technique, other) or _reason(other, technique)
            raise ValueError(
                f"{_describe(technique)} cannot be used together with {_describe(other)}"
                + (f": {reason}" if reason else ".")
                + " Remove one of them from Trainer(callbacks=...)."
            )
        shared = sorted(mine & takes_over(other) & EXCLUSIVE)
        if shared:
            raise ValueError(
                f"{_describe(technique)} and {_describe(other)} both take over {', '.join(shared)} of the run; "
                "only one callback can. Remove one of them from Trainer(callbacks=...)."
            )
    if "accumulation" in mine and getattr(trainer, "accumulate_grad_batches", 1) != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) conflicts with "
            f"{_describe(technique)}, which sets the accumulation factor itself: remove one of them."
        )


def _describe(callback: Any) -> str:
    describe = getattr(callback, "conflict_label", None)
    return describe() if callable(describe) else _name(callback)


def _reason(a: Any, b: Any) -> str | None:
    reasons = getattr(a, "conflict_reasons", None) or {}
    for cls in type(b).__mro__:
        if cls.__name__ in reasons:
            return str(reasons[cls.__name__])
    return None
