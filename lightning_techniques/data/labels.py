"""Finding the class labels of a training dataset (shared by the class-imbalance and curriculum techniques).

Labels are read without touching the inputs whenever the dataset exposes them: a ``targets`` / ``labels``
attribute (torchvision-style datasets, the demo's ``LabeledTensorDataset``), a ``TensorDataset`` (its last tensor),
``Subset`` (the parent's labels at its indices) and ``ConcatDataset`` (the parts' labels, concatenated). Only
otherwise is the dataset read once, item by item, taking the target of each item (element 1 of a tuple/list item,
or a ``y``/``target``/``label`` key of a dict item). When neither works the error says what was tried.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_techniques._internal.batch import get_targets

#: Dataset attributes read, in order, as the per-sample class labels.
LABEL_ATTRIBUTES: tuple[str, ...] = ("targets", "labels")


def _as_label_tensor(value: Any, where: str) -> torch.Tensor:
    try:
        labels = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{where} cannot be read as a 1-D tensor of class labels ({err}).") from None
    if labels.ndim != 1:
        raise ValueError(
            f"{where} has shape {tuple(labels.shape)}; class labels must be one integer per sample (1-D). "
            "One-hot or multi-label targets are not supported."
        )
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError(f"{where} holds non-integer values; class labels must be integers.")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{where} has dtype {labels.dtype}; class labels must be integers.")
    labels = labels.long()
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{where} holds negative labels (min {int(labels.min())}); class labels must be >= 0.")
    return labels


def _labels_without_items(dataset: Dataset) -> torch.Tensor | None:
    """Labels from attributes/structure only (no item is read), or None."""
    for attr in LABEL_ATTRIBUTES:
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value):
            labels = _as_label_tensor(value, f"{type(dataset).__name__}.{attr}")
            if len(labels) != len(dataset):  # type: ignore[arg-type]
                raise ValueError(
                    f"{type(dataset).__name__}.{attr} has {len(labels)} entries but the dataset has "
                    f"{len(dataset)} samples."  # type: ignore[arg-type]
                )
            return labels
    if isinstance(dataset, Subset):
        parent = _labels_without_items(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        parts = [_labels_without_items(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _as_label_tensor(dataset.tensors[-1], "TensorDataset's last tensor")
    return None


def find_labels(dataset: Dataset, target_key: str | int | None = None, indices: range | None = None) -> torch.Tensor:
    """The class label of every sample of ``dataset`` (or of the samples at ``indices``), as a 1-D ``int64`` CPU
    tensor.

    Reads a ``targets``/``labels`` attribute (also through ``Subset``/``ConcatDataset``) or a ``TensorDataset``'s
    last tensor without touching the inputs; otherwise reads each item (of ``indices``) once and takes its target
    (``target_key``: index or dict key of the target in an item; default element 1 or a ``y``/``target``/``label``
    key).

    Raises:
        TypeError / ValueError: when no labels can be found (the message says what was tried) or they are not
            one non-negative integer per sample.
    """
    if target_key is None:
        labels = _labels_without_items(dataset)
        if labels is not None:
            return labels if indices is None else labels[torch.as_tensor(list(indices), dtype=torch.long)]
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"Cannot find class labels: {type(dataset).__name__} has no len() (an IterableDataset?). "
            "Class-imbalance techniques need a map-style dataset."
        ) from None
    wanted = range(n) if indices is None else indices
    n = len(wanted)
    labels_list: list[torch.Tensor] = []
    for i in wanted:
        item = dataset[i]
        try:
            target = get_targets(item, target_key)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise TypeError(
                f"Cannot find class labels in {type(dataset).__name__}: it has no {'/'.join(LABEL_ATTRIBUTES)} "
                f"attribute and its items do not carry a target tensor ({err}). Give the dataset a `targets` "
                "attribute, or pass target_key=... / labels explicitly."
            ) from None
        labels_list.append(target.reshape(-1))
    flat = torch.cat(labels_list) if labels_list else torch.zeros(0, dtype=torch.long)
    if len(flat) != n:
        raise ValueError(
            f"The items of {type(dataset).__name__} carry {len(flat)} target values for {n} samples; class labels "
            "must be one integer per sample."
        )
    return _as_label_tensor(flat, f"the targets of {type(dataset).__name__}'s items")


def class_counts(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Number of samples per class (``float64``, length ``num_classes`` or ``max(label) + 1``)."""
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes={num_classes}.")
    size = num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
    return torch.bincount(labels, minlength=size).to(torch.float64)
