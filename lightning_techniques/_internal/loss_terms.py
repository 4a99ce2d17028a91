"""Adding terms to the training loss without editing ``training_step``.

One wrapper per module replaces ``training_step`` on the *instance*. It calls the user's ``training_step``, then
adds every registered term to the returned loss (a tensor, or the ``"loss"`` entry of a dict). Because the term
is added to the value ``training_step`` returns, everything Lightning does afterwards applies to it unchanged:
division by ``accumulate_grad_batches``, AMP gradient scaling, DDP gradient averaging, the ``loss`` in the
progress bar. Each term is logged as ``loss_terms/<name>``.

Under DDP Lightning reroutes ``training_step`` through the DDP wrapper's ``forward`` and looks the method up on the
instance, so the instance attribute is what runs (``lightning/pytorch/strategies/strategy.py::_ForwardRedirection``).

Manual optimisation is refused: there Lightning never sees the loss, so a term could not reach the gradients.

The wrapper is one layer of the method's patch stack (:mod:`.patching`), so it comes off whatever else wraps
``training_step``; and every term is also removed by the run's ``MechanismCleanup`` when the run ends or fails, so a
technique only calls ``handle.remove()`` in ``teardown``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_techniques._internal.compat import trainer_of
from lightning_techniques._internal.patching import MethodPatch, undo_at_run_end

#: ``fn(module, batch, batch_idx, loss) -> Tensor``: the term's value for this micro-batch (already weighted).
LossTermFn = Callable[[nn.Module, Any, int, torch.Tensor], torch.Tensor]

_ATTR = "_lt_loss_terms"


@dataclass
class _Term:
    name: str
    fn: LossTermFn
    log: bool


class LossTermHandle:
    """Returned by :func:`add_loss_term`; :meth:`remove` takes the term out again (idempotent)."""

    def __init__(self, registry: _Registry, name: str) -> None:
        self._registry = registry
        self.name = name

    @property
    def active(self) -> bool:
        """False once removed (by the technique, or by the mechanism's clean-up after a failed run)."""
        return self.name in self._registry.terms and self._registry.patch.active

    def remove(self) -> None:
        self._registry.remove(self.name)


class _Registry:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.terms: dict[str, _Term] = {}
        self.patch = MethodPatch(module, "training_step", self._make_wrapper)

    def _make_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if not self.terms or output is None:
                return output
            batch = args[0] if args else kwargs.get("batch")
            batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
            if isinstance(output, torch.Tensor):
                loss = output
            elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
                loss = output["loss"]
            else:
                raise TypeError(
                    "A loss term is registered but training_step returned "
                    f"{type(output).__name__}; expected a tensor or a dict with a 'loss' tensor."
                )
            total = loss
            for term in list(self.terms.values()):
                value = term.fn(self.module, batch, batch_idx, loss)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise TypeError(f"Loss term {term.name!r} must return a scalar tensor, got {value!r}.")
                total = total + value.reshape(()).to(loss.dtype)
                if term.log:
                    module: Any = self.module  # a LightningModule (nn.Module.__getattr__ is typed Tensor | Module)
                    module.log(f"loss_terms/{term.name}", value.detach(), on_step=True, on_epoch=True)
            if isinstance(output, torch.Tensor):
                return total
            new_output = dict(output)
            new_output["loss"] = total
            return new_output

        return training_step

    def add(self, name: str, fn: LossTermFn, log: bool) -> LossTermHandle:
        if name in self.terms:
            raise ValueError(f"A loss term named {name!r} is already registered on this module.")
        self.terms[name] = _Term(name, fn, log)
        return LossTermHandle(self, name)

    def remove(self, name: str) -> None:
        self.terms.pop(name, None)
        if not self.terms:
            self.patch.restore()
            self.module.__dict__.pop(_ATTR, None)


def add_loss_term(module: nn.Module, name: str, fn: LossTermFn, *, log: bool = True) -> LossTermHandle:
    """Add ``fn(module, batch, batch_idx, loss)`` to the loss ``module.training_step`` returns.

    Call it from a callback's ``setup`` and call ``handle.remove()`` in ``teardown``. Raises ``ValueError`` for a
    module using manual optimisation and for a duplicate ``name``.
    """
    if not getattr(module, "automatic_optimization", True):
        raise ValueError(
            f"Loss term {name!r} needs automatic optimisation: the module sets automatic_optimization=False, so "
            "Lightning never sees its loss. Add the term in your own training_step instead."
        )
    registry = module.__dict__.get(_ATTR)
    if registry is None or not registry.patch.active:
        registry = _Registry(module)
        module.__dict__[_ATTR] = registry
    handle = registry.add(name, fn, log)
    undo_at_run_end(trainer_of(module), handle.remove)  # also undone when the run fails
    return handle


def registered_loss_terms(module: nn.Module) -> list[str]:
    """Names of the loss terms currently registered on ``module``."""
    registry = module.__dict__.get(_ATTR)
    return list(registry.terms) if registry is not None else []
