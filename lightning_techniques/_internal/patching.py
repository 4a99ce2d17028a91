"""Wrapping one method of one object instance, reversibly, with any number of independent wrappers.

The shared mechanisms (loss terms, batch transforms, ``configure_optimizers`` composition) and a few techniques
reach into the run by replacing a method on the user's *instance* (never the class), so that the user's module
stays unmodified and other instances are untouched.

Several techniques may wrap the same method of the same object, and they are removed in whatever order their
callbacks run - which depends on the order of ``Trainer(callbacks=[...])`` and on when each technique is done
(one unwraps in ``on_fit_start``, another in ``teardown``). A naive "save the attribute, put it back" patch breaks
then: removing a lower wrapper while an upper one is installed either does nothing (the lower wrapper stays in
the call chain and the instance keeps an attribute after the run) or cuts the upper one out.

So there is ONE :class:`_PatchStack` per ``(object, attribute)``: it installs a single dispatcher function as the
instance attribute, which calls the wrappers top-down; every :class:`MethodPatch` is one layer of it. Each layer's
wrapper receives a ``call_next`` callable that always calls *whatever is currently below it*, so a layer can be
removed from the middle of the stack and the chain stays intact. When the last layer goes, the dispatcher is
removed and the instance attribute that was there before (or none) is restored - unless someone else has since
replaced the dispatcher, in which case their attribute is left alone (the dispatcher, still referenced by them,
then calls straight through to the original).

The stack is found through the dispatcher itself (an attribute of the function object), so nothing but the one
patched attribute is ever added to the instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_techniques._internal.lean_hooks import LeanHooks

_MISSING = object()
_STACK_ATTR = "__lt_patch_stack__"


class _PatchStack:
    """The layers currently wrapping ``obj.<name>`` (bottom first) and the dispatcher installed on the instance."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj = obj
        self.name = name
        self.own = obj.__dict__.get(name, _MISSING)  # the instance's own attribute before any layer, if any
        self.base: Callable[..., Any] = getattr(obj, name)  # what the bottom layer calls
        self.layers: list[MethodPatch] = []

        stack = self

        def dispatcher(*args: Any, **kwargs: Any) -> Any:  # (the top layer; called for every batch by some hooks)
            layers = stack.layers
            return layers[-1].wrapper(*args, **kwargs) if layers else stack.base(*args, **kwargs)

        # Lightning's ``is_overridden`` compares ``__code__`` with the parent's; the dispatcher has its own code, so
        # a patched hook counts as overridden, which is what makes Lightning call it.
        setattr(dispatcher, _STACK_ATTR, self)
        dispatcher.__name__ = name
        dispatcher.__qualname__ = f"{type(obj).__name__}.{name}"
        self.dispatcher = dispatcher
        object.__setattr__(obj, name, dispatcher)

    @classmethod
    def of(cls, obj: Any, name: str) -> _PatchStack:
        """The stack installed on ``obj.<name>``, created when there is none."""
        current = obj.__dict__.get(name, _MISSING)
        stack = getattr(current, _STACK_ATTR, None)
        if isinstance(stack, _PatchStack) and stack.obj is obj and stack.layers:
            return stack
        return cls(obj, name)

    def call_from(self, height: int, *args: Any, **kwargs: Any) -> Any:
        """Call the layer just below ``height`` (the original when none)."""
        if height <= 0 or not self.layers:
            return self.base(*args, **kwargs)
        return self.layers[min(height, len(self.layers)) - 1].wrapper(*args, **kwargs)

    def below(self, layer: MethodPatch) -> Callable[..., Any]:
        """A callable that calls whatever is below ``layer`` at call time (the original once ``layer`` is removed
        and nothing else is below)."""

        def call_next(*args: Any, **kwargs: Any) -> Any:
            layers = self.layers
            if layers and layers[0] is layer:  # the bottom layer (the common case): the original is below
                return self.base(*args, **kwargs)
            try:
                height = layers.index(layer)
            except ValueError:  # the layer was removed while a call through it was under way
                height = 0
            return self.call_from(height, *args, **kwargs)

        return call_next

    def remove(self, layer: MethodPatch) -> None:
        if layer in self.layers:
            self.layers.remove(layer)
        if self.layers:
            return
        if self.obj.__dict__.get(self.name, _MISSING) is not self.dispatcher:
            return  # replaced by someone else since: leave their attribute (our dispatcher now calls the original)
        if self.own is _MISSING:
            del self.obj.__dict__[self.name]
        else:
            object.__setattr__(self.obj, self.name, self.own)


class MethodPatch:
    """Wrap ``obj.<name>`` with ``make_wrapper(call_next)`` on this instance only, until :meth:`restore`.

    ``call_next`` calls what is below this layer at call time (another layer or the original method), so layers of
    one ``(obj, name)`` can be restored in any order. ``restore`` is idempotent.
    """

    def __init__(self, obj: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.obj = obj
        self.name = name
        self._stack = _PatchStack.of(obj, name)
        self.original: Callable[..., Any] = self._stack.below(self)
        self.wrapper = make_wrapper(self.original)
        self._stack.layers.append(self)

    @property
    def active(self) -> bool:
        return self in self._stack.layers

    def restore(self) -> None:
        self._stack.remove(self)


def patch_layers(obj: Any, name: str) -> int:
    """How many :class:`MethodPatch` layers currently wrap ``obj.<name>`` (0 when it is not patched)."""
    stack = getattr(obj.__dict__.get(name, _MISSING), _STACK_ATTR, None)
    return len(stack.layers) if isinstance(stack, _PatchStack) and stack.obj is obj else 0


class MechanismCleanup(LeanHooks, Callback):
    """The undo actions of everything the shared mechanisms installed for one Trainer's current run.

    Appended once to ``trainer.callbacks`` by :func:`undo_at_run_end`: on ``on_exception`` (a failed run: Lightning
    then calls no ``teardown``) and on ``teardown`` it runs every pending undo action, newest first. So the
    unregister-on-exception code exists once, here, instead of in every technique; a technique's own ``teardown``
    still removes what it installed (the actions are idempotent: a second call does nothing). It has no state, so
    nothing of it enters a checkpoint.
    """

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def run(self, raise_errors: bool = True) -> None:
        errors: list[Exception] = []
        while self.pending:
            action = self.pending.pop()
            try:
                action()
            except Exception as err:  # keep undoing the rest; report the first failure afterwards
                errors.append(err)
        if errors and raise_errors:
            raise errors[0]
        if errors:
            import warnings

            warnings.warn(f"Undoing a technique's changes after a failed run failed: {errors[0]!r}", stacklevel=2)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.run(raise_errors=False)  # never mask the run's own exception

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.run()


def undo_at_run_end(trainer: Any, action: Callable[[], None]) -> None:
    """Run ``action`` (idempotent) when ``trainer``'s current run fails or ends, whether or not the technique that
    installed something remembers to undo it. No-op without a Trainer (plain PyTorch use)."""
    callbacks = getattr(trainer, "callbacks", None)
    if not isinstance(callbacks, list):
        return
    cleanup = next((cb for cb in callbacks if isinstance(cb, MechanismCleanup)), None)
    if cleanup is None:
        cleanup = MechanismCleanup()
        callbacks.append(cleanup)  # last: it runs after every technique's own teardown / on_exception
    cleanup.pending.append(action)
