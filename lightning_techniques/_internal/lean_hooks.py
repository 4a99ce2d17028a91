"""Per-batch hooks a technique does not implement cost Lightning's dispatch nothing.

Lightning calls every per-batch hook (``on_train_batch_start``, ``on_before_backward``, ``on_after_backward``,
``on_before_optimizer_step``, ``on_before_zero_grad``, ``on_train_batch_end`` and the evaluation batch hooks) of
*every* callback, implemented or not, each inside a profiler context with a formatted action name: about 1.4 us per
callback and hook on a CPU, ~8 us per callback per training step - 6 % of a tiny MLP's step for 11 callbacks
that implement one hook each (``benchmarks/overhead.py``, the no-op row). Its dispatcher
(``lightning.pytorch.trainer.call._call_callback_hooks``) skips an attribute that is not callable
(``fn = getattr(callback, hook_name); if callable(fn): ...``).

:class:`LeanHooks` is a mixin that puts, for each per-batch hook a class does not implement, a descriptor that gives
Lightning's dispatcher ``None`` (skipped: no profiler context, no call) and *everybody else* Lightning's ordinary
no-op method: a user's or a wrapper's direct call ``callback.on_train_batch_start(...)``, ``super()`` from a
subclass that implements the hook, ``is_overridden``, ``inspect`` and the class itself
(``type(callback).on_train_batch_start is Callback.on_train_batch_start``). The dispatcher is recognised by its
code object (the frame that asked for the attribute); a Lightning whose dispatcher does not check ``callable`` (or
has none under that name) gets the ordinary method everywhere - nothing is skipped then, nothing breaks.

Use: ``class MyTechnique(LeanHooks, Callback)`` - the mixin first, so that its descriptors come before
``Callback``'s methods in the MRO; a hook the class (or a subclass, a user's included) defines is found before the
descriptor and dispatched as usual. ``tests/test_lean_hooks.py`` checks every registry entry for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from lightning.pytorch.callbacks import Callback

from lightning_techniques._internal import compat

#: The hooks Lightning calls once per batch (training, validation, test, predict).
PER_BATCH_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end",
    "on_validation_batch_start", "on_validation_batch_end", "on_test_batch_start", "on_test_batch_end",
    "on_predict_batch_start", "on_predict_batch_end",
)


class _UnimplementedHook:
    """Class attribute standing for a hook the class does not implement: ``None`` to Lightning's dispatcher,
    ``Callback``'s no-op to anyone else."""

    __slots__ = ("name", "base")

    def __init__(self, name: str) -> None:
        self.name = name
        self.base = getattr(Callback, name)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.base  # the class: the same function as Callback's (nothing overridden)
        # frame 0 is this method, frame 1 whoever evaluated the attribute (getattr is C: no frame of its own)
        if sys._getframe(1).f_code is compat.CALLBACK_DISPATCH_CODE:
            return None  # skipped by the dispatcher (it checks ``callable``)
        return self.base.__get__(instance, owner)

    def __repr__(self) -> str:
        return f"<hook {self.name} not implemented: skipped by Lightning's dispatcher>"


F = TypeVar("F", bound=Callable[..., Any])


class _ConditionalHook:
    """A hook the class implements but needs only while ``predicate(callback)`` holds (e.g. until a one-off
    initialisation is done): ``None`` to Lightning's dispatcher when it does not, the bound method otherwise and to
    anyone else."""

    def __init__(self, fn: Callable[..., Any], predicate: Callable[[Any], bool]) -> None:
        self.fn = fn
        self.predicate = predicate
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.fn  # the class: the function itself (Lightning's ``is_overridden`` sees an override)
        if not self.predicate(instance) and sys._getframe(1).f_code is compat.CALLBACK_DISPATCH_CODE:
            return None
        return self.fn.__get__(instance, owner)


def needed_while(predicate: Callable[[Any], bool]) -> Callable[[F], F]:
    """Decorate a per-batch hook that does work only while ``predicate(self)`` is true: Lightning's dispatcher then
    skips it (no profiler context, no call) once the predicate is false; a direct call or ``super()`` still runs it.
    The predicate is evaluated on every dispatch: keep it to an attribute read.

    Example::

        class LSUVInit(LeanHooks, Callback):
            @needed_while(lambda self: not self.done)
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx): ...
    """

    def decorate(fn: F) -> F:
        return _ConditionalHook(fn, predicate)  # type: ignore[return-value]

    return decorate


class LeanHooks:
    """Mixin for callbacks: the per-batch hooks the class does not implement are skipped by Lightning's dispatcher
    instead of being called as no-ops (see the module docstring). Put it first: ``class X(LeanHooks, Callback)``."""


for _name in PER_BATCH_HOOKS:
    setattr(LeanHooks, _name, _UnimplementedHook(_name))


def skipped_hooks(callback: Any) -> list[str]:
    """The per-batch hooks of ``callback`` that Lightning's dispatcher skips now (those its class does not implement,
    and those of :func:`needed_while` whose predicate is false), empty when the dispatcher cannot skip (see
    ``compat.CALLBACK_DISPATCH_CODE``)."""
    if compat.CALLBACK_DISPATCH_CODE is None:
        return []
    mro = type(callback).__mro__
    out = []
    for name in PER_BATCH_HOOKS:
        if name in vars(callback):
            continue  # an instance attribute comes first
        found = next((vars(klass)[name] for klass in mro if name in vars(klass)), None)
        if isinstance(found, _UnimplementedHook) or (
                isinstance(found, _ConditionalHook) and not found.predicate(callback)):
            out.append(name)
    return out
