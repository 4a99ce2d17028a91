"""Gradient clipping beyond norm/value: adaptive gradient clipping (AGC) and AutoClip.

* AGC - Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization", 2021:
  clip each unit's gradient (a row of a Linear weight, an output channel of a conv) when its norm exceeds
  ``clipping`` times the norm of that unit's weights.
* AutoClip - Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
  Networks", 2020: clip the total gradient norm at the ``percentile``-th percentile of all gradient norms seen so far.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_techniques._internal import compat, grad_norms
from lightning_techniques._internal.grad_norms import combined_norm, float32_norms, host_norms, total_norm
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics
from lightning_techniques._internal.validation import check_number, check_positive


# ---------------------------------------------------------------------------------------------- functional core
def _grads(parameters: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad.detach() for p in parameters if p.grad is not None]


def grad_norm_tensor(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``grads`` together as a float32 0-d tensor on their device, without a host sync: one fused
    ``torch._foreach_norm`` over the tensors (computed in float32, so fp16/bf16 gradients cannot overflow it) and the
    norm of the stacked per-tensor norms, as ``torch.nn.utils.clip_grad_norm_`` does."""
    return total_norm(grads)


def total_grad_norm(parameters: Iterable[Tensor]) -> float:
    """L2 norm of all gradients together (parameters without ``.grad`` are ignored; 0.0 when none has one)."""
    return combined_norm(host_norms(_grads(parameters)))


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit, as in the NFNets reference code: over all dims but the first for weights with
    ``ndim >= 2`` (``[out, in]`` Linear, ``[out, in, kh, kw]`` conv; result broadcastable to ``x``), and the norm of
    the whole tensor for scalars and vectors (biases, gains)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def _row_norms(x: Tensor) -> Tensor:
    """L2 norm of every output unit of a tensor with ``ndim >= 2`` (over all dims but the first), as a float32
    vector: one op, no reshape, no copy."""
    dims = tuple(range(1, x.ndim))
    if x.dtype == torch.float32:
        return torch.linalg.vector_norm(x, dim=dims)
    return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32)


def _unit_norm_vector(mats: list[Tensor], vecs: list[Tensor], device: torch.device) -> Tensor:
    """The unit norms of ``mats`` (one per output unit, in order) followed by the whole-tensor norms of ``vecs``
    (scalars and vectors, one fused ``torch._foreach_norm``), as one float32 vector on ``device``."""
    parts = [_row_norms(t) for t in mats]
    parts = [t if t.device == device else t.to(device) for t in parts]
    if vecs:
        parts.append(torch.stack(float32_norms(vecs, device)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def _agc_factors(params: Sequence[Tensor], clipping: float, eps: float) -> tuple[Tensor, Tensor]:
    """AGC's clipping factors for ``params`` (each with a gradient), without a host sync and without changing
    anything: the unit norms of every tensor are gathered into one vector (one norm op per weight matrix, one fused
    norm for all vectors) and the factors ``min(1, clipping * max(||w||, eps) / ||g||)`` computed in one chain of
    in-place vector ops.

    Returns ``(unit_grad_norms, factors)`` on the device, units in the order of :func:`_apply_unit_factors_`; the
    total norms before and after clipping are ``||unit_grad_norms||`` and ``||unit_grad_norms * factors||``
    (``||g|| = ||(||g_unit||)_unit||``), so they need no further pass over the gradients. A unit whose gradient norm
    is 0 gets the factor 1 (``x / 0 = inf``, capped at 1); an infinite gradient norm gives 0 and a NaN gives NaN,
    which is how :class:`AdaptiveGradientClipping` tells a non-finite step from the smallest factor alone."""
    grads = cast(list[Tensor], [p.grad for p in params])
    device = grads[0].device
    mats = [i for i, p in enumerate(params) if p.ndim >= 2]
    vecs = [i for i, p in enumerate(params) if p.ndim < 2]
    weight_norms = _unit_norm_vector([params[i].detach() for i in mats], [params[i].detach() for i in vecs], device)
    grad_norms = _unit_norm_vector([grads[i] for i in mats], [grads[i] for i in vecs], device)
    # weight_norms becomes the factor vector in place: clipping * max(||w||, eps) / ||g||, at most 1
    factors = weight_norms.clamp_min_(eps).mul_(clipping).div_(grad_norms).clamp_max_(1.0)
    return grad_norms, factors


@torch.no_grad()
def _apply_unit_factors_(params: Sequence[Tensor], factors: Tensor) -> None:
    """Multiply every unit's gradient by its factor (``factors`` from :func:`_agc_factors`: the units of the weight
    matrices in order, then one per vector) with one fused ``torch._foreach_mul_``."""
    grads = cast(list[Tensor], [p.grad for p in params])
    mats = [i for i, p in enumerate(params) if p.ndim >= 2]
    vecs = [i for i, p in enumerate(params) if p.ndim < 2]
    pieces = factors.split([params[i].shape[0] for i in mats] + ([len(vecs)] if vecs else []))
    per_tensor = [piece.view(-1, *([1] * (params[i].ndim - 1))) for piece, i in zip(pieces, mats)]
    if vecs:
        per_tensor.extend(pieces[-1].unbind())
    ordered = [grads[i] for i in mats] + [grads[i] for i in vecs]
    device = factors.device
    if all(g.dtype == torch.float32 and g.device == device for g in ordered):
        torch._foreach_mul_(ordered, per_tensor)  # broadcasts each unit's factor over its gradient, one dispatch
    else:
        for grad, factor in zip(ordered, per_tensor):
            grad.mul_(factor.to(device=grad.device, dtype=grad.dtype))


class _AGCPlan:
    """AGC on one fixed list of float32 parameters on one device, with preallocated buffers: the unit norms are
    written straight into slices of two float32 vectors (weights, gradients), which become the factors in place, and
    the factors' per-tensor views are made once. A step is one norm op per weight matrix and one fused norm for all
    vectors (weights, then gradients), the chain of vector ops, and one fused multiply: no stack, cat, split or view
    per step (on small models each op is a host-side dispatch; this halves their number).

    Two buffer sets: a step writes into the one not holding the last step the caller kept (``keep``), so a skipped
    (non-finite) step never overwrites the values the caller reads later."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        mats = [p for p in params if p.ndim >= 2]
        vecs = [p for p in params if p.ndim < 2]
        self.mats, self.vecs = mats, vecs
        self.order = mats + vecs  # the order of the units in the buffers
        self.dims = [tuple(range(1, p.ndim)) for p in mats]
        split = sum(p.shape[0] for p in mats)
        device = params[0].device
        self.sets = []
        for _ in range(2):
            w = torch.empty(split + len(vecs), dtype=torch.float32, device=device)
            g = torch.empty_like(w)
            bounds = [0]
            for p in mats:
                bounds.append(bounds[-1] + p.shape[0])
            w_mats = [w[a:b] for a, b in zip(bounds, bounds[1:])]
            g_mats = [g[a:b] for a, b in zip(bounds, bounds[1:])]
            views = [s.view(-1, *([1] * (p.ndim - 1))) for s, p in zip(w_mats, mats)] + list(w[split:].unbind())
            self.sets.append((w, g, w_mats, w[split:], g_mats, g[split:], views))
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.kept = 1  # the set of the last step the caller kept; the next step writes into the other

    @staticmethod
    def fits(params: list[Tensor]) -> bool:
        """Whether a plan can run ``params``: float32 weights (and so gradients) on one device."""
        device = params[0].device
        return all(p.dtype == torch.float32 and p.device == device for p in params)

    def matches(self, params: list[Tensor]) -> bool:
        return params is self.params or (
            len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params)))

    @torch.no_grad()
    def factors(self, clipping: float, eps: float) -> tuple[Tensor, Tensor, int]:
        """``(unit_grad_norms, factors, set index)`` of the current gradients, nothing changed (the factors as in
        :func:`_agc_factors`)."""
        index = 1 - self.kept
        w, g, w_mats, w_vec, g_mats, g_vec, _ = self.sets[index]
        grads = cast(list[Tensor], [p.grad for p in self.order])
        n = len(self.mats)
        for p, dims, out in zip(self.mats, self.dims, w_mats):
            torch.linalg.vector_norm(p, dim=dims, out=out)
        for grad, dims, out in zip(grads, self.dims, g_mats):
            torch.linalg.vector_norm(grad, dim=dims, out=out)
        if self.vecs:
            torch.stack(torch._foreach_norm(self.vecs, 2), out=w_vec)
            torch.stack(torch._foreach_norm(grads[n:], 2), out=g_vec)
        torch.addcdiv(self.zero, w.clamp_min_(eps), g, value=clipping, out=w).clamp_max_(1.0)  # 3 ops in place
        return g, w, index

    @torch.no_grad()
    def apply_(self, index: int) -> None:
        """Multiply every unit's gradient by its factor of the step computed into set ``index``."""
        torch._foreach_mul_(cast(list[Tensor], [p.grad for p in self.order]), self.sets[index][6])


def _agc_(params: Sequence[Tensor], clipping: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """AGC in place on the parameters that have a gradient, without a host sync; ``(norm_before, norm_after,
    units_clipped)`` as 0-d tensors."""
    params = [p for p in params if p.grad is not None]
    if not params:
        zero = torch.zeros(())
        return zero, zero, zero
    grad_norms, factors = _agc_factors(params, clipping, eps)
    _apply_unit_factors_(params, factors)
    return torch.linalg.vector_norm(grad_norms), torch.linalg.vector_norm(grad_norms * factors), (factors < 1.0).sum()


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3
) -> tuple[int, int]:
    """AGC in place: ``g <- g * clipping * max(||w||, eps) / ||g||`` for every unit where ``||g|| / max(||w||, eps)
    > clipping`` (norms unit-wise, see :func:`unitwise_norm`).

    Returns ``(units_clipped, units_total)``.
    """
    check_positive("clipping", clipping)
    check_positive("eps", eps)
    params = [p for p in parameters if p.grad is not None]
    total = sum(p.shape[0] if p.ndim >= 2 else 1 for p in params)
    _, _, clipped = _agc_(params, float(clipping), float(eps))
    return int(clipped), total


def percentile_of_sorted(values: Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile (0-100) of already sorted ``values``, with the linear interpolation of
    ``numpy.percentile`` / ``torch.quantile``: O(1)."""
    n = len(values)
    if n == 0:
        raise ValueError("a percentile needs at least one value.")
    position = (n - 1) * percentile / 100.0
    low = math.floor(position)
    high = min(low + 1, n - 1)
    fraction = position - low
    return float(values[low] + (values[high] - values[low]) * fraction)


def autoclip_threshold(history: Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile (0-100, linear interpolation as ``numpy.percentile``) of ``history``."""
    check_number("percentile", percentile, low=0.0, high=100.0)
    if not history:
        raise ValueError("autoclip_threshold needs at least one gradient norm in history.")
    return percentile_of_sorted(sorted(float(v) for v in history), percentile)


class SlidingWindowPercentile:
    """The last ``size`` values of a stream (``None``: all), kept in arrival order (a deque) and in sorted order (a
    list), so that adding a value and reading a percentile cost O(log n) comparisons plus one memmove of the sorted
    list, never a sort of the whole history.

    ``values``: the window in arrival order (a new list, oldest first).
    """

    def __init__(self, size: int | None = None, values: Iterable[float] = ()) -> None:
        self.size = size
        self._values: deque[float] = deque()
        self._sorted: list[float] = []
        for v in values:
            self.append(v)

    @property
    def values(self) -> list[float]:
        return list(self._values)

    def append(self, value: float) -> None:
        value = float(value)
        self._values.append(value)
        bisect.insort(self._sorted, value)
        if self.size is not None and len(self._values) > self.size:
            oldest = self._values.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]

    def percentile(self, percentile: float) -> float:
        return percentile_of_sorted(self._sorted, percentile)

    def __len__(self) -> int:
        return len(self._values)


@torch.no_grad()
def clip_grad_norm_to_(parameters: Iterable[Tensor], max_norm: float, norm: float | None = None) -> bool:
    """Scale all gradients so that their total L2 norm is at most ``max_norm``; True when they were scaled."""
    grads = _grads(parameters)
    norm = (float(grad_norm_tensor(grads)) if grads else 0.0) if norm is None else norm
    if norm <= max_norm or norm == 0.0:
        return False
    torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return True


def _selected(module: nn.Module, exclude: Sequence[str] | None) -> list[tuple[str, Tensor]]:
    return [
        (name, p)
        for name, p in module.named_parameters()
        if p.requires_grad and not (exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude))
    ]


class _ClippingCallback(LeanHooks, Callback):
    """Shared adapter: acts in ``on_before_optimizer_step`` (unscaled, DDP-synchronised gradients), logs norms at
    the Trainer's ``log_every_n_steps`` cadence. One host sync per optimizer step (what the step's decision needs)."""

    takes_over: frozenset[str] = frozenset({"gradients"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()
    remembers_grad_norm = True  # the step's total gradient norm: lightning_techniques/_internal/grad_norms.py

    _prefix = "clip"

    def __init__(self, log: bool) -> None:
        # never ``self.log``: Lightning overwrites that attribute with the module's ``log`` before setup
        self._log_enabled = check_log_flag("log", log)
        self.steps = 0
        self.clipped_steps = 0
        self._norm_before: float | Tensor = 0.0  # or the unit norms: computed when read
        self._norm_after: float | tuple[Tensor, Tensor] = 0.0  # or (unit norms, factors): computed when read
        self._param_cache: tuple[weakref.ref[Any], list[Tensor]] | None = None
        # whether a technique before / after this one shares the step's gradient norm (set in setup)
        self._recall_norm = self._remember_norm = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if compat.is_fsdp(trainer.strategy) or compat.is_deepspeed(trainer.strategy):
            raise ValueError(
                f"{type(self).__name__} does not support {type(trainer.strategy).__name__}: gradients are sharded, "
                "so per-rank norms are not the model's norms."
            )
        self._check_module(pl_module)
        self._param_cache = None
        self._recall_norm, self._remember_norm = grad_norms.peers(trainer, self)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._param_cache = None  # re-select once per epoch (a technique may freeze or add parameters)

    def _check_module(self, pl_module: Any) -> None:
        pass

    @property
    def last_norm_before(self) -> float:
        """Total L2 gradient norm before the last step's clipping (computed from that step's norms when first read)."""
        if isinstance(self._norm_before, Tensor):
            self._norm_before = float(torch.linalg.vector_norm(self._norm_before))
        return self._norm_before

    @last_norm_before.setter
    def last_norm_before(self, value: float) -> None:
        self._norm_before = value

    @property
    def last_norm_after(self) -> float:
        """Total L2 gradient norm after the last step's clipping (computed from that step's norms when first read)."""
        if isinstance(self._norm_after, tuple):
            unit_norms, factors = self._norm_after
            self._norm_after = float(torch.linalg.vector_norm(unit_norms * factors))
        return self._norm_after

    @last_norm_after.setter
    def last_norm_after(self, value: float) -> None:
        self._norm_after = value

    @property
    def clip_fraction(self) -> float:
        """Fraction of optimizer steps on which the gradients were clipped."""
        return self.clipped_steps / self.steps if self.steps else 0.0

    def _clip(self, trainer: Any, pl_module: Any,
              params: list[Tensor]) -> tuple[bool, float | Tensor, float | tuple[Tensor, Tensor]] | None:
        """Clip in place; ``(clipped, norm_before, norm_after)``, or None for a non-finite step (left alone).
        ``norm_before`` may be the unit norms and ``norm_after`` the ``(unit norms, factors)`` they are computed from
        when read."""
        raise NotImplementedError  # pragma: no cover

    def _metrics(self) -> dict[str, float]:
        return {
            f"{self._prefix}/grad_norm_before": self.last_norm_before,
            f"{self._prefix}/grad_norm_after": self.last_norm_after,
            f"{self._prefix}/clip_fraction": self.clip_fraction,
        }

    def _selected_params(self, pl_module: Any) -> list[Tensor]:
        # keyed by a weak reference, not id(): a new module can reuse a freed module's id, and would then be given the
        # old module's parameters
        cache = self._param_cache
        if cache is None or cache[0]() is not pl_module:
            cache = self._param_cache = (weakref.ref(pl_module), [p for _, p in self._params(pl_module)])
        return cache[1]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        selected = self._selected_params(pl_module)
        params = [p for p in selected if p.grad is not None]
        if len(params) == len(selected):
            params = selected  # the same list every step: a plan built for it recognises it by identity
        if not params:
            return  # e.g. a step skipped by NonFiniteGuard
        result = self._clip(trainer, pl_module, params)
        if result is None:
            return  # non-finite: the GradScaler (16-mixed) or NonFiniteGuard skips this step; do not clip or record
        clipped, self._norm_before, self._norm_after = result
        self.steps += 1
        self.clipped_steps += int(clipped)
        if self._log_enabled:
            log_step_metrics(pl_module, self._metrics)

    def _params(self, pl_module: Any) -> list[tuple[str, Tensor]]:
        return _selected(pl_module, None)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "clipped_steps": self.clipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.clipped_steps = int(state_dict.get("clipped_steps", 0))


class AdaptiveGradientClipping(_ClippingCallback):
    """Adaptive gradient clipping (AGC): clip each unit's gradient relative to the norm of that unit's weights.

    Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization" (NFNets),
    2021. For every output unit (a row of a Linear weight, an output channel of a conv kernel; the whole tensor for
    biases/gains), when ``||G|| / max(||W||, eps) > clipping`` the unit's gradient is rescaled to
    ``clipping * max(||W||, eps) / ||G|| * G``. The paper does not clip the final classifier: pass
    ``exclude=["head.*"]`` (glob patterns on parameter names).

    Runs in ``on_before_optimizer_step``: after every accumulated micro-batch, on unscaled gradients under
    ``16-mixed`` and on the all-reduced gradients under DDP (so every rank clips identically). Logs
    ``agc/grad_norm_before``, ``agc/grad_norm_after`` (total L2 norms) and ``agc/clip_fraction`` (fraction of steps
    where any unit was clipped) at the Trainer's ``log_every_n_steps`` cadence (and on the run's last step);
    ``unit_clip_fraction`` holds the fraction of units clipped on the last step. The unit norms of all tensors are
    written into preallocated buffers (float32 weights on one device; otherwise gathered per step), the factors
    computed there in one chain of vector ops and applied with one fused multiply, only on steps where a unit is
    clipped; one host sync per step (the smallest factor, which also tells a non-finite step).

    Args:
        clipping: the threshold lambda (paper: 0.01 for batch 4096; larger for small batches, e.g. 0.02-0.16).
        eps: floor for the weight norm (paper: 1e-3), so zero-initialised units can still move.
        exclude: glob patterns of parameter names not to clip (e.g. the final layer).
        log: log the norms with ``pl_module.log`` (``False``: log nothing).

    Example::

        trainer = L.Trainer(callbacks=[AdaptiveGradientClipping(clipping=0.05, exclude=["head.*"])])

    Limits: refuses FSDP/DeepSpeed (sharded gradients); steps with non-finite gradients are left alone (the
    GradScaler or :class:`NonFiniteGuard` skips them).
    """

    _prefix = "agc"

    def __init__(
        self, clipping: float = 0.01, eps: float = 1e-3, exclude: list[str] | None = None, log: bool = True
    ) -> None:
        check_positive("clipping", clipping)
        check_positive("eps", eps)
        if exclude is not None and (isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude)):
            raise TypeError(f"exclude must be a list of glob patterns (strings), got {exclude!r}.")
        super().__init__(log)
        self.clipping = float(clipping)
        self.eps = float(eps)
        self.exclude = list(exclude) if exclude else None
        self._last_factors: Tensor | None = None
        self._plan: _AGCPlan | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._plan = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._plan = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._plan = None  # holds the parameters

    @property
    def unit_clip_fraction(self) -> float:
        """Fraction of the units clipped on the last step (computed from that step's factors when read)."""
        factors = self._last_factors
        return float((factors < 1.0).float().mean()) if factors is not None and len(factors) else 0.0

    def _check_module(self, pl_module: Any) -> None:
        if not self._params(pl_module):
            names = [n for n, _ in pl_module.named_parameters()]
            raise ValueError(f"AdaptiveGradientClipping: exclude={self.exclude} leaves no parameter. Parameters: {names}")

    def _params(self, pl_module: Any) -> list[tuple[str, Tensor]]:
        return _selected(pl_module, self.exclude)

    def _clip(self, trainer: Any, pl_module: Any,
              params: list[Tensor]) -> tuple[bool, float | Tensor, float | tuple[Tensor, Tensor]] | None:
        plan = self._plan
        if plan is None or not plan.matches(params):
            plan = self._plan = _AGCPlan(params) if _AGCPlan.fits(params) else None
        if plan is not None:
            unit_norms, factors, index = plan.factors(self.clipping, self.eps)
        else:
            unit_norms, factors = _agc_factors(params, self.clipping, self.eps)
        smallest = float(factors.min())  # the step's one host sync
        if not smallest > 0.0:  # NaN: a NaN gradient (or weight); 0: an infinite gradient norm
            return None  # left alone: the GradScaler or NonFiniteGuard skips the step
        self._last_factors = factors
        clipped = smallest < 1.0
        if plan is not None:
            plan.kept = index  # the next step writes into the other buffer set
            if clipped:
                plan.apply_(index)
        elif clipped:
            _apply_unit_factors_(params, factors)
        # for AutoClip later in this step, computed only if it asks: the norm after clipping, or before it when
        # nothing changed and no technique before this one remembered it already
        if self._remember_norm and (clipped or not self._recall_norm):
            grads = cast(list[Tensor], [p.grad for p in params])
            kept = unit_norms * factors if clipped else unit_norms
            grad_norms.remember(trainer, grads, lambda: float(torch.linalg.vector_norm(kept)))
        return clipped, unit_norms, (unit_norms, factors)


class AutoClip(_ClippingCallback):
    """AutoClip: clip the total gradient norm at a percentile of the gradient norms observed so far.

    Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
    IEEE MLSP 2020. On every optimizer step the total L2 gradient norm is appended to the history, and the gradients
    are rescaled to norm ``percentile(history, p)`` when they exceed it (the paper's reference code includes the
    current norm in the history; so does this). The history is part of the checkpoint, so a resumed run clips
    exactly as an uninterrupted one.

    The history is a sliding window of the last ``history_size`` norms (default 10,000), kept sorted as well as in
    arrival order: a step costs O(log n) comparisons and one memmove, never a sort of the whole history, and the
    checkpointed state stays bounded (~90 kB at the default) however long the run. With ``history_size=None`` the
    window is the whole run, as in the paper, and the state grows by one float per step.

    Runs in ``on_before_optimizer_step`` on unscaled (``16-mixed``), accumulated and, under DDP, all-reduced
    gradients (identical history on every rank). Logs ``autoclip/grad_norm_before``, ``autoclip/grad_norm_after``,
    ``autoclip/clip_fraction`` and ``autoclip/threshold`` at the Trainer's ``log_every_n_steps`` cadence (and on the
    run's last step). One host sync per optimizer step (the per-tensor norms, read together, which the history
    needs) - none when a :class:`NonFiniteGuard` or :class:`AdaptiveGradientClipping` before it in ``callbacks``
    computed the step's norm already: AutoClip then uses theirs (of the gradients as they are when it runs).

    Args:
        percentile: p in [0, 100] (paper: 10 works well for audio source separation).
        history_size: the window: the last ``history_size`` norms (default 10,000; ``None``: every norm of the run, as
            in the paper, with a state that grows with the run).
        warmup_steps: record norms but do not clip during the first steps (0: clip from the first step).
        log: log the norms and threshold with ``pl_module.log`` (``False``: log nothing).

    Example::

        trainer = L.Trainer(callbacks=[AutoClip(percentile=10)])

    Limits: refuses FSDP/DeepSpeed; non-finite norms are neither recorded nor clipped (the step is skipped by the
    GradScaler or :class:`NonFiniteGuard`).
    """

    _prefix = "autoclip"
    recalls_grad_norm = True  # uses the step's norm from NonFiniteGuard / AGC before it (no second pass)

    def __init__(
        self, percentile: float = 10.0, history_size: int | None = 10_000, warmup_steps: int = 0, log: bool = True
    ) -> None:
        check_number("percentile", percentile, low=0.0, high=100.0)
        if history_size is not None:
            check_positive("history_size", history_size, integer=True)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        super().__init__(log)
        self.percentile = float(percentile)
        self.history_size = history_size
        self.warmup_steps = warmup_steps
        self._window = SlidingWindowPercentile(history_size)
        self.last_threshold = float("inf")

    @property
    def history(self) -> list[float]:
        """The norms in the window, oldest first (at most ``history_size``; a copy)."""
        return self._window.values

    def _clip(self, trainer: Any, pl_module: Any, params: list[Tensor]) -> tuple[bool, float, float] | None:
        grads = cast(list[Tensor], [p.grad for p in params])  # the parameters with a gradient
        norm = grad_norms.recall(trainer, grads) if self._recall_norm else None  # by NonFiniteGuard / AGC, earlier
        fresh = norm is None
        if norm is None:  # the step's one host sync: the history needs the norm
            norm = combined_norm(host_norms(grads))
        if not math.isfinite(norm):
            return None
        self._window.append(norm)
        self.last_threshold = self._window.percentile(self.percentile)
        if self.steps < self.warmup_steps or norm <= self.last_threshold or norm == 0.0:
            if self._remember_norm and fresh:  # (a recalled norm stays valid: nothing changed)
                grad_norms.remember(trainer, grads, norm)
            return False, norm, norm
        factor = self.last_threshold / (norm + 1e-6)
        with torch.no_grad():
            torch._foreach_mul_(grads, factor)
        if self._remember_norm:
            grad_norms.remember(trainer, grads, norm * factor)
        return True, norm, norm * factor

    def _metrics(self) -> dict[str, float]:
        return {**super()._metrics(), "autoclip/threshold": self.last_threshold}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._window = SlidingWindowPercentile(self.history_size, state_dict.get("history", []))
