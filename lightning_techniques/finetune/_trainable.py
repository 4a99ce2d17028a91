"""What the parameter-efficient methods of this package share: targets by name / regular expression / layer type,
``requires_grad`` frozen for the run and given back, frozen parameters kept out of the optimizer.

:class:`TrainOnly` is the one session object a method opens in ``setup`` (its snapshot taken *before* the method
changes the module, because peft freezes the base while it injects) and closes at ``teardown`` / ``on_exception``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_techniques._internal.validation import resolve_layer_type


def check_targets(name: str, value: Any, allow_empty: bool = False) -> list[str]:
    """A list of target specs (layer paths, regular expressions or layer-type names) from a string or a sequence;
    raises ``TypeError`` / ``ValueError`` naming the argument."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, type)) for v in value):
        raise TypeError(f"{name} must be a layer path / regular expression / layer type or a list of them, "
                        f"got {value!r}.")
    specs = [v if isinstance(v, str) else f"{v.__module__}.{v.__qualname__}" for v in value]
    if not specs and not allow_empty:
        raise ValueError(f"{name}: name at least one layer (a path, a regular expression or a layer type).")
    if any(not s for s in specs):
        raise ValueError(f"{name}: empty layer name in {specs!r}.")
    return specs


def _as_type(spec: str) -> type | None:
    if not spec[:1].isupper() and "." not in spec:
        return None
    try:
        return resolve_layer_type(spec, "targets")
    except (ValueError, TypeError):
        return None


def resolve_targets(model: nn.Module, specs: Sequence[str], argument: str,
                    types: tuple[type, ...] | None = None) -> list[str]:
    """The ``named_modules()`` paths of ``model`` that ``specs`` select, in module order: a spec is an exact path,
    a regular expression matched in full against paths, or a layer type (class name of ``torch.nn`` or an import
    path, also any class name found in the model). A spec that matches nothing - or only layers not of ``types`` -
    raises ``ValueError`` naming ``argument`` and listing the layers that exist."""
    named = [(path, module) for path, module in model.named_modules() if path]
    class_names = {type(module).__name__ for _, module in named}
    chosen: set[str] = set()
    for spec in specs:
        layer_type = _as_type(spec)
        hits = []
        for path, module in named:
            if path == spec or (spec in class_names and type(module).__name__ == spec) or (
                    layer_type is not None and isinstance(module, layer_type)):
                hits.append(path)
                continue
            try:
                if re.fullmatch(spec, path):
                    hits.append(path)
            except re.error:
                pass
        if types is not None:
            hits = [path for path in hits if isinstance(model.get_submodule(path), types)]
        if not hits:
            wanted = f" of type {'/'.join(t.__name__ for t in types)}" if types else ""
            existing = [f"{path} ({type(module).__name__})" for path, module in named
                        if types is None or isinstance(module, types)] or [path for path, _ in named]
            raise ValueError(f"{argument}: {spec!r} matches no layer{wanted}; the model has: {', '.join(existing)}.")
        chosen.update(hits)
    return [path for path, _ in named if path in chosen]


def _selected(name: str, trainable: Iterable[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in trainable)


class TrainOnly:
    """Freeze every parameter of ``module`` except those named by ``trainable`` (parameter names or module paths),
    remember the ``requires_grad`` every parameter had in ``snapshot`` (taken with :meth:`snapshot` before the
    method changed the module), keep frozen parameters out of the run's optimizers (:meth:`prune_optimizers`, from
    ``on_fit_start``: the optimizers exist then and a resumed optimizer state is loaded after it), and give every
    pre-existing parameter its ``requires_grad`` back on :meth:`close` (idempotent).

    A ``configure_optimizers`` that hands the optimizer all of ``module.parameters()`` is handled: the frozen ones are
    taken out of its parameter groups before the first step (groups keep their order, possibly empty), so they are
    never updated - not even by weight decay."""

    def __init__(self, module: nn.Module, trainable: Iterable[str], snapshot: dict[int, tuple[nn.Parameter, bool]]):
        self.saved = snapshot
        trainable = list(trainable)
        for name, param in module.named_parameters():
            param.requires_grad_(_selected(name, trainable))
        if not any(p.requires_grad for p in module.parameters()):
            self.close()
            raise ValueError("nothing left to train: the selected layers have no parameters.")
        self.closed = False

    @staticmethod
    def snapshot(module: nn.Module) -> dict[int, tuple[nn.Parameter, bool]]:
        return {id(p): (p, p.requires_grad) for p in module.parameters()}

    @staticmethod
    def prune_optimizers(optimizers: Iterable[torch.optim.Optimizer]) -> int:
        """Take parameters with ``requires_grad=False`` out of every group of ``optimizers``; returns how many."""
        removed = 0
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                keep = [p for p in group["params"] if p.requires_grad]
                removed += len(group["params"]) - len(keep)
                for p in group["params"]:
                    if not p.requires_grad:
                        optimizer.state.pop(p, None)
                group["params"] = keep
        return removed

    def close(self) -> None:
        for param, flag in self.saved.values():
            param.requires_grad_(flag)
        self.closed = True


class FinetuneSession:
    """Mixin of the fine-tuning callbacks: ``_begin`` (snapshot, before changing the module), ``_train_only``
    (freeze all but the method's parameters), frozen parameters pruned from the optimizers in ``on_fit_start``,
    ``_end`` (``requires_grad`` back) from ``teardown`` and ``on_exception``."""

    _snapshot: dict[int, tuple[nn.Parameter, bool]] | None = None
    _session: TrainOnly | None = None

    def _begin(self, module: nn.Module) -> None:
        self._snapshot = TrainOnly.snapshot(module)

    def _train_only(self, module: nn.Module, trainable: Iterable[str]) -> None:
        assert self._snapshot is not None, "_begin first"
        self._session = TrainOnly(module, trainable, self._snapshot)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._session is not None:
            TrainOnly.prune_optimizers(trainer.optimizers)

    def _end(self) -> None:
        if self._snapshot is not None:
            for param, flag in self._snapshot.values():
                param.requires_grad_(flag)
        self._snapshot = None
        self._session = None
