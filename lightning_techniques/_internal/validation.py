"""Argument checks shared by every technique's ``__init__``: each raises naming the argument and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {choices}.")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> Any:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    lo_ok = low is None or (value >= low if low_inclusive else value > low)
    hi_ok = high is None or (value <= high if high_inclusive else value < high)
    if not (lo_ok and hi_ok):
        left = "-inf" if low is None else f"{low}"
        right = "inf" if high is None else f"{high}"
        bracket = ("[" if low_inclusive and low is not None else "(") + left + ", " + right
        bracket += "]" if high_inclusive and high is not None else ")"
        raise ValueError(f"{name} must be {kind} in {bracket}, got {value!r}.")
    return value


def check_positive(name: str, value: Any, integer: bool = False) -> Any:
    return check_number(name, value, low=0, low_inclusive=False, integer=integer)


def check_non_negative(name: str, value: Any, integer: bool = False) -> Any:
    return check_number(name, value, low=0, integer=integer)


def check_probability(name: str, value: Any) -> Any:
    return check_number(name, value, low=0.0, high=1.0)


def resolve_layer_type(spec: Any, argument: str) -> type:
    """An ``nn.Module`` subclass from a class or an import path (``"Conv2d"`` means ``torch.nn.Conv2d``): how techniques
    take layer types from YAML. Raises ``ValueError`` naming ``argument`` for a path that does not import and
    ``TypeError`` for anything that is not a module class."""
    import importlib

    from torch import nn

    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        module_name, _, attr = spec.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name or "torch.nn"), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{argument}: cannot import layer type {spec!r} ({err}).") from None
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    raise TypeError(f"{argument}: layer types must be nn.Module classes or their import paths, got {spec!r}.")
