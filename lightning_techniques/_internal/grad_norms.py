"""Gradient norms in float32, and the total gradient norm of an optimizer step shared between techniques.

:class:`~lightning_techniques.NonFiniteGuard`, :class:`~lightning_techniques.AutoClip` and
:class:`~lightning_techniques.AdaptiveGradientClipping` all act in ``on_before_optimizer_step`` and each needs the
gradient norm of the same step; on small models every pass over the gradients is a measurable share of the step
(issue #14). Whoever computes the total L2 norm of a set of gradients :func:`remember` s it; the next technique of the
same step :func:`recall` s it instead of reading the gradients again, and a technique that rescales the gradients
remembers the norm after its rescaling.

A remembered norm is used only when all of these still hold (otherwise the caller computes it afresh):

* the same Trainer and the same optimizer step (``global_step`` and the batch counter): nothing carries over to the
  next step;
* exactly the same gradient tensors (identity, in any order) - a gradient replaced by another tensor invalidates it;
* none of them changed in place since: every in-place op on a tensor (or on a view or ``.detach()`` of it) bumps its
  version counter (``Tensor._version``), which is compared. Changes made through ``.data`` do not bump it; a user
  callback that rescales gradients through ``p.grad.data`` between two of these techniques is not seen (write
  ``p.grad.mul_(...)``, as ``torch.nn.utils.clip_grad_norm_`` does).

Only weak references to the gradients are kept, so nothing here holds memory across steps.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

_NARROW = (torch.float16, torch.bfloat16)


def float32_norms(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """The L2 norm of every tensor as a float32 0-d tensor on ``device``, in order.

    One fused ``torch._foreach_norm`` per kind: float32 tensors as they are (no cast or copy), float16/bfloat16
    reduced in float32 (so their squares cannot overflow), float64 in float64 and then cast; sparse tensors by their
    stored values."""
    tensors = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    if all(t.dtype == torch.float32 for t in tensors):
        norms = list(torch._foreach_norm(tensors, 2))
    else:
        slots: list[Tensor | None] = [None] * len(tensors)
        narrow = [i for i, t in enumerate(tensors) if t.dtype in _NARROW]
        wide = [i for i, t in enumerate(tensors) if t.dtype not in _NARROW]
        if narrow:
            for i, n in zip(narrow, torch._foreach_norm([tensors[i] for i in narrow], 2, dtype=torch.float32)):
                slots[i] = n
        if wide:
            for i, n in zip(wide, torch._foreach_norm([tensors[i] for i in wide], 2)):
                slots[i] = n.to(torch.float32)
        norms = [n for n in slots if n is not None]
    return [n if n.device == device else n.to(device) for n in norms]


def total_norm(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``grads`` together as a float32 0-d tensor on the first one's device (zero for none), without a
    host sync: the norm of the per-tensor norms, as ``torch.nn.utils.clip_grad_norm_`` computes it."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(float32_norms(grads, grads[0].device)))


def host_norms(tensors: Sequence[Tensor]) -> list[float]:
    """The float32 L2 norm of every tensor (:func:`float32_norms`), read on the host with one sync (``[]`` for none).

    Three dispatches whatever the number of tensors (one fused norm, a stack, the read): fewer than norming on the
    device and reading the total (on small models each dispatch is a measurable share of a step). Combine them with
    :func:`combined_norm`."""
    if not tensors:
        return []
    try:  # dense float32/float16/bfloat16 tensors on one device: no per-tensor Python work
        stacked = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
    except (RuntimeError, NotImplementedError):  # float64, sparse, or several devices
        stacked = torch.stack(float32_norms(tensors, tensors[0].device))
    return stacked.tolist()


def combined_norm(norms: Sequence[float]) -> float:
    """The L2 norm of tensors from their norms: ``sqrt(sum(n ** 2))`` in double precision without overflow
    (``math.hypot``); NaN or Inf when one of them is."""
    return math.hypot(*norms)


# ------------------------------------------------------------------------------------------ the step's shared norm
class _Remembered:
    __slots__ = ("key", "grads", "total")

    def __init__(self, key: tuple[int, int, int], grads: dict[int, tuple[weakref.ref[Tensor], int]],
                 total: float | Callable[[], float]) -> None:
        self.key = key
        self.grads = grads
        self.total = total


_last: _Remembered | None = None


def peers(trainer: Any, technique: Any) -> tuple[bool, bool]:
    """``(recall, remember)`` for ``technique`` among ``trainer.callbacks`` (in the order Lightning calls them):
    whether a callback before it remembers the step's norm (class attribute ``remembers_grad_norm = True``), so
    that looking it up can pay off, and whether one after it recalls it (``recalls_grad_norm = True``), so that
    remembering it can. Both cost a little per step; a technique does neither when it would be for nothing."""
    callbacks = list(getattr(trainer, "callbacks", ()))
    index = next((i for i, cb in enumerate(callbacks) if cb is technique), len(callbacks))
    recall = any(getattr(cb, "remembers_grad_norm", False) for cb in callbacks[:index])
    remember = any(getattr(cb, "recalls_grad_norm", False) for cb in callbacks[index + 1:])
    return recall, remember


def step_key(trainer: Any) -> tuple[int, int, int]:
    """What identifies the current optimizer step of ``trainer``: the Trainer, its ``global_step`` and the number of
    training batches it has started (a stand-in without a fit loop counts as one step per ``global_step``)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    progress = getattr(getattr(loop, "batch_progress", None), "total", None)
    return id(trainer), int(getattr(trainer, "global_step", 0)), int(getattr(progress, "ready", 0))


def remember(trainer: Any, grads: Sequence[Tensor], total: float | Callable[[], float]) -> None:
    """Record ``total``, the L2 norm of exactly ``grads`` as they are now (a float, or a function computing it when
    first recalled), for the rest of the current step of ``trainer``."""
    global _last
    _last = _Remembered(step_key(trainer), {id(g): (weakref.ref(g), g._version) for g in grads}, total)


def recall(trainer: Any, grads: Sequence[Tensor]) -> float | None:
    """The total L2 norm of ``grads`` remembered in this step of ``trainer``, or None when there is none that is still
    valid for exactly these, unchanged, tensors (see the module docstring)."""
    entry = _last
    if entry is None or len(entry.grads) != len(grads) or entry.key != step_key(trainer):
        return None
    known = entry.grads
    for g in grads:
        seen = known.get(id(g))
        if seen is None or seen[0]() is not g or seen[1] != g._version:
            return None
    if callable(entry.total):
        entry.total = float(entry.total())
    return entry.total


def forget() -> None:
    """Drop the remembered norm (e.g. after a technique changed the gradients without computing their new norm)."""
    global _last
    _last = None
