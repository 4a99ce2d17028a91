"""Distributed helpers: rank-0 work + broadcast, all-reduced statistics, decisions agreed by every rank.

They take the Trainer's ``strategy`` (``trainer.strategy``) and are no-ops in a single process, so a technique
calls them unconditionally. Collective calls must be reached by every rank in the same order.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def is_distributed(strategy: Any) -> bool:
    """True when ``strategy`` runs more than one process with an initialised process group."""
    return getattr(strategy, "world_size", 1) > 1 and dist.is_available() and dist.is_initialized()


def broadcast_object(strategy: Any, obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable Python objects)."""
    if not is_distributed(strategy):
        return obj
    return strategy.broadcast(obj, src=src)


def broadcast_module_(strategy: Any, module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` in place with rank ``src``'s values."""
    if not is_distributed(strategy):
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def all_reduce_sum(strategy: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; dtype kept, float64 included)."""
    if not is_distributed(strategy):
        return tensor.clone()
    out = tensor.detach().clone().to(strategy.root_device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_max(strategy: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks."""
    if not is_distributed(strategy):
        return tensor.clone()
    out = tensor.detach().clone().to(strategy.root_device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(tensor.device)


def all_reduce_min(strategy: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``tensor`` over ranks."""
    if not is_distributed(strategy):
        return tensor.clone()
    out = tensor.detach().clone().to(strategy.root_device)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(tensor.device)


def agree_any(strategy: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if not is_distributed(strategy):
        return bool(flag)
    return bool(strategy.reduce_boolean_decision(bool(flag), all=False))


def agree_all(strategy: Any, flag: bool) -> bool:
    """True on every rank only when ``flag`` is true on every rank."""
    if not is_distributed(strategy):
        return bool(flag)
    return bool(strategy.reduce_boolean_decision(bool(flag), all=True))
