"""Wrapping one method of one object instance, reversibly.

Two mechanisms (loss terms and batch transforms) reach into the run by replacing a method on the user's
*instance* (never the class), so that the user's module stays unmodified and other instances are untouched.
This helper does that once: it records whether the instance already had its own attribute, installs the
wrapper, and restores exactly what was there on :meth:`MethodPatch.restore`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class MethodPatch:
    """Replace ``obj.<name>`` with ``make_wrapper(original)`` on this instance only, until :meth:`restore`."""

    def __init__(self, obj: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.obj = obj
        self.name = name
        self._own = obj.__dict__.get(name, _MISSING)
        self.original: Callable[..., Any] = getattr(obj, name)
        self.wrapper = make_wrapper(self.original)
        # Lightning's ``is_overridden`` compares ``__code__`` with the parent's; a wrapper always has its own code,
        # so a patched hook counts as overridden, which is what makes Lightning call it.
        object.__setattr__(obj, name, self.wrapper)

    @property
    def active(self) -> bool:
        return self.obj.__dict__.get(self.name, _MISSING) is self.wrapper

    def restore(self) -> None:
        if not self.active:
            return
        if self._own is _MISSING:
            del self.obj.__dict__[self.name]
        else:
            object.__setattr__(self.obj, self.name, self._own)
