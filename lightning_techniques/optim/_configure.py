"""One composition point for ``configure_optimizers``, shared by the optimizer and LR-schedule callbacks.

Lightning calls ``pl_module.configure_optimizers`` (looked up with ``getattr``) during ``strategy.setup``, after every
callback's ``setup``. Callbacks that change what it returns register here in their ``setup``; the first registration
installs ONE instance-level :class:`~lightning_techniques._internal.patching.MethodPatch` layer, the last
unregistration (in ``teardown`` or ``on_exception``) removes it - also when another technique's layer (e.g.
``AccumulationScheduler``'s) sits above or below it, in any order. Because the wrapper only runs later, the
callbacks compose in any order:

1. an *optimizer provider* (at most one, e.g. :class:`~lightning_techniques.optim.optimizers.OptimizerCallback`)
   builds the optimizers; without one the user's own ``configure_optimizers`` is called and parsed;
2. every *scheduler provider* (e.g. :class:`~lightning_techniques.optim.schedules.LRSchedule`) gets the resulting
   optimizers and returns Lightning LR-scheduler config dicts for them.

The result is returned as ``([optimizers], [scheduler config dicts])``, which Lightning accepts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lightning_techniques._internal.compat import parse_optimizer_config, trainer_of
from lightning_techniques._internal.patching import MethodPatch, undo_at_run_end
from lightning_techniques._internal.step_logging import write_step_metrics

OptimizerProvider = Callable[[nn.Module], Any]
SchedulerProvider = Callable[[nn.Module, list], list]


@dataclass
class _Composition:
    patch: MethodPatch | None = None
    optimizer_provider: tuple[Any, OptimizerProvider] | None = None
    scheduler_providers: list[tuple[Any, SchedulerProvider]] = field(default_factory=list)


_COMPOSITIONS: weakref.WeakKeyDictionary[nn.Module, _Composition] = weakref.WeakKeyDictionary()


def _parse_user_config(conf: Any) -> tuple[list, list[dict[str, Any]]]:
    """Optimizers and scheduler config dicts from anything ``configure_optimizers`` may return."""
    optimizers, schedulers, monitor = parse_optimizer_config(conf)
    configs = []
    for scheduler in schedulers:
        if isinstance(scheduler, dict):
            configs.append(dict(scheduler))
        elif isinstance(scheduler, ReduceLROnPlateau):
            configs.append({"scheduler": scheduler, "monitor": monitor})
        else:
            configs.append({"scheduler": scheduler})
    return list(optimizers), configs


def _composed(module: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    def configure_optimizers(*args: Any, **kwargs: Any) -> Any:
        composition = _COMPOSITIONS.get(module)
        if composition is not None and composition.optimizer_provider is not None:
            optimizers, configs = _parse_user_config(composition.optimizer_provider[1](module))
        else:
            optimizers, configs = _parse_user_config(original(*args, **kwargs))
        for owner, provider in composition.scheduler_providers if composition is not None else []:
            added = provider(module, optimizers)
            taken = {id(c["scheduler"].optimizer) for c in configs}
            clash = [c for c in added if id(c["scheduler"].optimizer) in taken]
            if clash:
                raise ValueError(
                    f"{type(owner).__name__}: the optimizer already has an LR scheduler "
                    f"({[type(c['scheduler']).__name__ for c in configs]}), from the module's configure_optimizers "
                    "or another schedule callback. Two schedulers on one optimizer overwrite each other's LR: "
                    "remove one of them."
                )
            configs.extend(added)
        if not configs:
            return optimizers
        return optimizers, configs

    return configure_optimizers


def _ensure(module: nn.Module) -> _Composition:
    composition = _COMPOSITIONS.get(module)
    if composition is None:
        composition = _Composition()
        _COMPOSITIONS[module] = composition
    if composition.patch is None or not composition.patch.active:
        composition.patch = MethodPatch(module, "configure_optimizers", lambda original: _composed(module, original))
    return composition


def register_optimizer_provider(module: nn.Module, owner: Any, provider: OptimizerProvider) -> None:
    """Let ``owner`` build the optimizers of ``module`` (``provider(module)`` returns what configure_optimizers may)."""
    composition = _ensure(module)
    current = composition.optimizer_provider
    if current is not None and current[0] is not owner:
        raise ValueError(
            f"{type(owner).__name__}: {type(current[0]).__name__} already chooses the optimizer of this module; "
            "use only one optimizer callback."
        )
    composition.optimizer_provider = (owner, provider)
    undo_at_run_end(trainer_of(module), lambda: unregister(module, owner))


def register_scheduler_provider(module: nn.Module, owner: Any, provider: SchedulerProvider) -> None:
    """Let ``owner`` add LR schedulers: ``provider(module, optimizers)`` returns Lightning scheduler config dicts."""
    composition = _ensure(module)
    composition.scheduler_providers = [(o, p) for o, p in composition.scheduler_providers if o is not owner]
    composition.scheduler_providers.append((owner, provider))
    undo_at_run_end(trainer_of(module), lambda: unregister(module, owner))


def unregister(module: nn.Module, owner: Any) -> None:
    """Remove ``owner``'s providers; the last one out restores the module's own ``configure_optimizers``."""
    composition = _COMPOSITIONS.get(module)
    if composition is None:
        return
    if composition.optimizer_provider is not None and composition.optimizer_provider[0] is owner:
        composition.optimizer_provider = None
    composition.scheduler_providers = [(o, p) for o, p in composition.scheduler_providers if o is not owner]
    if composition.optimizer_provider is None and not composition.scheduler_providers:
        if composition.patch is not None:
            composition.patch.restore()
        del _COMPOSITIONS[module]


def log_learning_rates(pl_module: Any, optimizers: list, prefix: str = "lr") -> dict[str, float]:
    """Log ``<prefix>-<group>`` for every parameter group (its ``"name"`` or ``pg<i>``) as this training batch's step
    metrics (``step_logging.write_step_metrics``: where ``pl_module.log`` would put them, without its cost).

    Called from a callback's training-batch hooks; the value is the same on every rank, so no sync is needed.
    With several optimizers the names get the optimizer index: ``lr-<i>-<group>``.
    """
    values: dict[str, float] = {}
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            name = group.get("name") or f"pg{j}"
            key = f"{prefix}-{name}" if len(optimizers) == 1 else f"{prefix}-{i}-{name}"
            values[key] = float(group["lr"])
    write_step_metrics(trainer_of(pl_module), pl_module, values)
    return values
