"""Reading and replacing the model input inside a batch of any common shape.

Techniques that need "the input tensor" of a batch (LSUV, normalisation, noise, attribution loggers) use these
two functions so that tuples, lists, dicts and bare tensors are handled the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: Keys tried, in order, when a batch is a mapping and no ``input_key`` was given.
INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "pixel_values", "input_ids", "image", "images", "features")
#: Keys tried, in order, for the target of a mapping batch.
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels")


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a mapping with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} elements"
    return f"an object of type {type(batch).__name__}"


def _resolve_key(batch: Any, key: str | int | None, candidates: tuple[str, ...], default_index: int, what: str) -> Any:
    if isinstance(batch, torch.Tensor):
        if key is not None or default_index != 0:
            raise ValueError(f"The batch is a bare tensor; it has no {what} to select with key {key!r}.")
        return None
    if isinstance(batch, Mapping):
        if key is not None:
            if key not in batch:
                raise KeyError(f"{what}_key={key!r} is not in the batch; the batch has keys {sorted(map(str, batch))}.")
            return key
        for k in candidates:
            if k in batch:
                return k
        raise KeyError(
            f"Could not find the {what} in a mapping batch with keys {sorted(map(str, batch))}; "
            f"tried {list(candidates)}. Pass {what}_key=... to name it."
        )
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        index = default_index if key is None else key
        if not isinstance(index, int) or not -len(batch) <= index < len(batch):
            raise IndexError(f"{what}_key={index!r} does not index {_describe(batch)}.")
        return index
    raise TypeError(f"Cannot find the {what} in {_describe(batch)}; expected a tensor, tuple/list or dict batch.")


def get_inputs(batch: Any, input_key: str | int | None = None) -> torch.Tensor:
    """Return the input tensor of ``batch``: the tensor itself, element 0 of a tuple/list, or a dict entry."""
    key = _resolve_key(batch, input_key, INPUT_KEYS, 0, "input")
    value = batch if key is None else batch[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"The batch's input ({key!r}) is a {type(value).__name__}, not a tensor.")
    return value


def get_targets(batch: Any, target_key: str | int | None = None) -> torch.Tensor:
    """Return the target tensor of ``batch``: element 1 of a tuple/list, or a dict entry."""
    key = _resolve_key(batch, target_key, TARGET_KEYS, 1, "target")
    if key is None:
        raise ValueError("The batch is a bare tensor; it carries no targets.")
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"The batch's target ({key!r}) is a {type(value).__name__}, not a tensor.")
    return value


def _replace(batch: Any, key: Any, value: Any) -> Any:
    if key is None:
        return value
    if isinstance(batch, Mapping):
        new = dict(batch) if not isinstance(batch, dict) else batch.copy()
        new[key] = value
        try:
            mapping_type: Any = type(batch)  # a concrete Mapping class, called like dict (Mapping itself is abstract)
            return mapping_type(new) if not isinstance(batch, dict) else new
        except TypeError:  # mapping types that cannot be rebuilt from a dict
            return new
    items = list(batch)
    items[key] = value
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*items)
    return type(batch)(items)


def set_inputs(batch: Any, inputs: torch.Tensor, input_key: str | int | None = None) -> Any:
    """Return a batch like ``batch`` whose input is ``inputs`` (the original batch is not modified)."""
    return _replace(batch, _resolve_key(batch, input_key, INPUT_KEYS, 0, "input"), inputs)


def set_targets(batch: Any, targets: torch.Tensor, target_key: str | int | None = None) -> Any:
    """Return a batch like ``batch`` whose target is ``targets`` (the original batch is not modified)."""
    key = _resolve_key(batch, target_key, TARGET_KEYS, 1, "target")
    if key is None:
        raise ValueError("The batch is a bare tensor; it carries no targets to replace.")
    return _replace(batch, key, targets)
