"""Gradient clipping beyond norm/value: adaptive gradient clipping (AGC) and AutoClip.

* AGC - Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization", 2021:
  clip each unit's gradient (a row of a Linear weight, an output channel of a conv) when its norm exceeds
  ``clipping`` times the norm of that unit's weights.
* AutoClip - Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
  Networks", 2020: clip the total gradient norm at the ``percentile``-th percentile of all gradient norms seen so far.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_techniques._internal.validation import check_number, check_positive


# ---------------------------------------------------------------------------------------------- functional core
def total_grad_norm(parameters: Iterable[Tensor]) -> float:
    """L2 norm of all gradients together (parameters without ``.grad`` are ignored; 0.0 when none has one)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit, as in the NFNets reference code: over all dims but the first for weights with
    ``ndim >= 2`` (``[out, in]`` Linear, ``[out, in, kh, kw]`` conv; result broadcastable to ``x``), and the norm of
    the whole tensor for scalars and vectors (biases, gains)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


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
    clipped, total = 0, 0
    for p in parameters:
        if p.grad is None:
            continue
        grad = p.grad
        max_norm = unitwise_norm(p.detach().float()).clamp_min(eps) * clipping
        grad_norm = unitwise_norm(grad.float())
        trigger = grad_norm > max_norm
        scale = torch.where(trigger, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        grad.mul_(scale.to(grad.dtype))
        clipped += int(trigger.sum())
        total += trigger.numel()
    return clipped, total


def autoclip_threshold(history: Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile (0-100, linear interpolation as ``numpy.percentile``) of ``history``."""
    check_number("percentile", percentile, low=0.0, high=100.0)
    if not history:
        raise ValueError("autoclip_threshold needs at least one gradient norm in history.")
    values = torch.tensor(list(history), dtype=torch.float64)
    return float(torch.quantile(values, percentile / 100.0))


@torch.no_grad()
def clip_grad_norm_to_(parameters: Iterable[Tensor], max_norm: float, norm: float | None = None) -> bool:
    """Scale all gradients so that their total L2 norm is at most ``max_norm``; True when they were scaled."""
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(params) if norm is None else norm
    if norm <= max_norm or norm == 0.0:
        return False
    factor = max_norm / (norm + 1e-6)
    for p in params:
        p.grad.mul_(factor)
    return True


def _selected(module: nn.Module, exclude: Sequence[str] | None) -> list[tuple[str, Tensor]]:
    return [
        (name, p)
        for name, p in module.named_parameters()
        if p.requires_grad and not (exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude))
    ]


class _ClippingCallback(Callback):
    """Shared adapter: acts in ``on_before_optimizer_step`` (unscaled, DDP-synchronised gradients), logs norms."""

    _prefix = "clip"

    def __init__(self, log: bool) -> None:
        self.log = bool(log)
        self.steps = 0
        self.clipped_steps = 0
        self.last_norm_before = 0.0
        self.last_norm_after = 0.0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        name = type(trainer.strategy).__name__.lower()
        if "fsdp" in name or "deepspeed" in name:
            raise ValueError(
                f"{type(self).__name__} does not support {type(trainer.strategy).__name__}: gradients are sharded, "
                "so per-rank norms are not the model's norms."
            )
        self._check_module(pl_module)

    def _check_module(self, pl_module: Any) -> None:
        pass

    @property
    def clip_fraction(self) -> float:
        """Fraction of optimizer steps on which the gradients were clipped."""
        return self.clipped_steps / self.steps if self.steps else 0.0

    def _clip(self, trainer: Any, pl_module: Any, params: list[Tensor], norm: float) -> bool:  # pragma: no cover
        raise NotImplementedError

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        params = [p for _, p in self._params(pl_module)]
        if not any(p.grad is not None for p in params):
            return  # e.g. a step skipped by NonFiniteGuard
        before = total_grad_norm(params)
        if not math.isfinite(before):
            return  # non-finite: the GradScaler (16-mixed) or NonFiniteGuard skips this step; do not clip or record
        clipped = self._clip(trainer, pl_module, params, before)
        after = total_grad_norm(params) if clipped else before
        self.steps += 1
        self.clipped_steps += int(clipped)
        self.last_norm_before, self.last_norm_after = before, after
        if self.log:
            opts = dict(on_step=True, on_epoch=False)
            pl_module.log(f"{self._prefix}/grad_norm_before", before, **opts)
            pl_module.log(f"{self._prefix}/grad_norm_after", after, **opts)
            pl_module.log(f"{self._prefix}/clip_fraction", self.clip_fraction, **opts)

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
    where any unit was clipped); ``unit_clip_fraction`` holds the fraction of units clipped on the last step.

    Args:
        clipping: the threshold lambda (paper: 0.01 for batch 4096; larger for small batches, e.g. 0.02-0.16).
        eps: floor for the weight norm (paper: 1e-3), so zero-initialised units can still move.
        exclude: glob patterns of parameter names not to clip (e.g. the final layer).
        log: log the norms with ``pl_module.log``.

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
        self.unit_clip_fraction = 0.0

    def _check_module(self, pl_module: Any) -> None:
        if not self._params(pl_module):
            names = [n for n, _ in pl_module.named_parameters()]
            raise ValueError(f"AdaptiveGradientClipping: exclude={self.exclude} leaves no parameter. Parameters: {names}")

    def _params(self, pl_module: Any) -> list[tuple[str, Tensor]]:
        return _selected(pl_module, self.exclude)

    def _clip(self, trainer: Any, pl_module: Any, params: list[Tensor], norm: float) -> bool:
        clipped, total = adaptive_clip_grad_(params, self.clipping, self.eps)
        self.unit_clip_fraction = clipped / total if total else 0.0
        return clipped > 0


class AutoClip(_ClippingCallback):
    """AutoClip: clip the total gradient norm at a percentile of the gradient norms observed so far.

    Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
    IEEE MLSP 2020. On every optimizer step the total L2 gradient norm is appended to the history, and the gradients
    are rescaled to norm ``percentile(history, p)`` when they exceed it (the paper's reference code includes the
    current norm in the history; so does this). The history is part of the checkpoint, so a resumed run clips
    exactly as an uninterrupted one.

    Runs in ``on_before_optimizer_step`` on unscaled (``16-mixed``), accumulated and, under DDP, all-reduced
    gradients (identical history on every rank). Logs ``autoclip/grad_norm_before``, ``autoclip/grad_norm_after``,
    ``autoclip/clip_fraction`` and ``autoclip/threshold``.

    Args:
        percentile: p in [0, 100] (paper: 10 works well for audio source separation).
        history_size: keep only the last ``history_size`` norms (``None``: all, as in the paper).
        warmup_steps: record norms but do not clip during the first steps (0: clip from the first step).
        log: log the norms with ``pl_module.log``.

    Example::

        trainer = L.Trainer(callbacks=[AutoClip(percentile=10)])

    Limits: refuses FSDP/DeepSpeed; non-finite norms are neither recorded nor clipped (the step is skipped by the
    GradScaler or :class:`NonFiniteGuard`).
    """

    _prefix = "autoclip"

    def __init__(
        self, percentile: float = 10.0, history_size: int | None = None, warmup_steps: int = 0, log: bool = True
    ) -> None:
        check_number("percentile", percentile, low=0.0, high=100.0)
        if history_size is not None:
            check_positive("history_size", history_size, integer=True)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        super().__init__(log)
        self.percentile = float(percentile)
        self.history_size = history_size
        self.warmup_steps = warmup_steps
        self.history: list[float] = []
        self.last_threshold = float("inf")

    def _clip(self, trainer: Any, pl_module: Any, params: list[Tensor], norm: float) -> bool:
        self.history.append(norm)
        if self.history_size is not None and len(self.history) > self.history_size:
            del self.history[: len(self.history) - self.history_size]
        self.last_threshold = autoclip_threshold(self.history, self.percentile)
        if self.log:
            pl_module.log("autoclip/threshold", self.last_threshold, on_step=True, on_epoch=False)
        if self.steps < self.warmup_steps:
            return False
        return clip_grad_norm_to_(params, self.last_threshold, norm)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [float(v) for v in state_dict.get("history", [])]
