"""Finding and reconfiguring the criterion a LightningModule holds as an attribute.

The common Lightning pattern is ``self.criterion = nn.CrossEntropyLoss()`` in ``__init__`` and
``loss = self.criterion(logits, y)`` in ``training_step``. Techniques that change *how the loss is computed*
(class weights, label smoothing, focal loss, soft targets for MixUp) do it here, through :class:`CriterionHandle`:

* :meth:`CriterionHandle.set` changes options of the existing criterion (``weight``, ``pos_weight``,
  ``label_smoothing`` ...). Tensor options are stored as **non-persistent** buffers, so they move with the module
  to its device but never enter the module's ``state_dict``: a checkpoint stays loadable into the plain module, and
  the technique keeps what it set in its own callback state.
* :meth:`CriterionHandle.replace` swaps in another criterion module for the run.
* :meth:`CriterionHandle.restore` puts back exactly what was there (call it from ``teardown``; after a failed run
  the run's ``MechanismCleanup`` calls it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from lightning_techniques._internal.compat import trainer_of
from lightning_techniques._internal.patching import undo_at_run_end

_MISSING = object()


def find_criteria(module: nn.Module) -> dict[str, nn.Module]:
    """Direct attributes of ``module`` that are loss modules (``torch.nn.modules.loss._Loss`` subclasses)."""
    return {name: child for name, child in module.named_children() if isinstance(child, _Loss)}


def find_criterion(module: nn.Module, attr: str | None = None) -> tuple[str, nn.Module]:
    """Return ``(name, criterion)``: ``module.<attr>``, or the single loss-module attribute when ``attr`` is None.

    Raises ``AttributeError`` naming what exists when nothing (or more than one candidate) is found.
    """
    if attr is not None:
        criterion = getattr(module, attr, None)
        if not isinstance(criterion, nn.Module):
            raise AttributeError(
                f"criterion_attr={attr!r}: {type(module).__name__} has no nn.Module attribute of that name. "
                f"Loss modules it does have: {sorted(find_criteria(module)) or 'none'}."
            )
        return attr, criterion
    found = find_criteria(module)
    if len(found) == 1:
        return next(iter(found.items()))
    children = sorted(name for name, _ in module.named_children())
    if not found:
        raise AttributeError(
            f"{type(module).__name__} holds no loss module as an attribute (children: {children}). Keep the criterion "
            "as an attribute, e.g. `self.criterion = nn.CrossEntropyLoss()`, or pass criterion_attr=... naming it."
        )
    raise AttributeError(
        f"{type(module).__name__} holds several loss modules {sorted(found)}; pass criterion_attr=... to choose one."
    )


class CriterionHandle:
    """Reversible changes to the criterion held by ``module`` (see the module docstring)."""

    def __init__(self, module: nn.Module, attr: str | None = None) -> None:
        self.module = module
        self.name, self.criterion = find_criterion(module, attr)
        self._original_criterion = self.criterion
        self._undo: list[tuple[nn.Module, str, Any, bool]] = []  # (obj, option, old value, was persistent buffer)
        undo_at_run_end(trainer_of(module), self.restore)  # also undone when the run fails

    def options(self) -> list[str]:
        """The options :meth:`set` accepts for this criterion."""
        public = [k for k in vars(self.criterion) if not k.startswith("_") and k != "training"]
        return sorted(set(public) | set(self.criterion._buffers))

    def set(self, **options: Any) -> None:
        """Set criterion options, e.g. ``set(weight=tensor, label_smoothing=0.1)``; raises for unknown options."""
        crit = self.criterion
        unknown = [k for k in options if k not in self.options()]
        if unknown:
            raise ValueError(
                f"{type(crit).__name__} (module.{self.name}) has no option {unknown}; it has {self.options()}."
            )
        for key, value in options.items():
            if key in crit._buffers:
                persistent = key not in crit._non_persistent_buffers_set
                self._undo.append((crit, key, crit._buffers[key], persistent))
                if value is not None and not isinstance(value, torch.Tensor):
                    value = torch.as_tensor(value, dtype=torch.float32)
                if value is not None:
                    ref = next(iter(self.module.parameters()), None)
                    value = value.to(ref.device) if ref is not None else value
                crit.register_buffer(key, value, persistent=False)
            else:
                self._undo.append((crit, key, getattr(crit, key), False))
                setattr(crit, key, value)

    def replace(self, new_criterion: nn.Module) -> None:
        """Use ``new_criterion`` as ``module.<name>`` until :meth:`restore`."""
        if not isinstance(new_criterion, nn.Module):
            raise TypeError(f"new_criterion must be an nn.Module, got {type(new_criterion).__name__}.")
        ref = next(iter(self.module.parameters()), None)
        if ref is not None:
            new_criterion = new_criterion.to(ref.device)
        setattr(self.module, self.name, new_criterion)
        self.criterion = new_criterion

    def restore(self) -> None:
        """Undo every :meth:`set` (newest first) and any :meth:`replace`."""
        while self._undo:
            obj, key, old, persistent = self._undo.pop()
            if key in obj._buffers:
                if old is not None and isinstance(old, torch.Tensor):
                    current = obj._buffers[key]
                    old = old.to(current.device) if current is not None else old
                obj.register_buffer(key, old, persistent=persistent)
                if persistent:
                    obj._non_persistent_buffers_set.discard(key)
            else:
                setattr(obj, key, old)
        if getattr(self.module, self.name, None) is not self._original_criterion:
            setattr(self.module, self.name, self._original_criterion)
        self.criterion = self._original_criterion
