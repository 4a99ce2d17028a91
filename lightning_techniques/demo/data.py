"""Bundled real data for the demo and the tests: scikit-learn's digits and breast-cancer sets (no download)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_techniques._internal.validation import check_number, check_positive
from lightning_techniques.data.resumable import (  # noqa: F401 - re-exported: the demo's loaders are the public ones
    EpochPermutation,
    ResumableDataLoader,
    epoch_shuffle_sampler,
)


class LabeledTensorDataset(Dataset):
    """``(x[i], y[i])`` pairs with the labels exposed as ``.targets`` (what class-imbalance techniques read)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length.")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def _split(n: int, val_fraction: float, test_fraction: float, seed: int, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    train_val, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    rel_val = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(train_val, test_size=rel_val, random_state=seed, stratify=labels[train_val])
    return np.sort(train), np.sort(val), np.sort(test)


class _SplitDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int, val_fraction: float, test_fraction: float, seed: int, num_workers: int):
        super().__init__()
        check_positive("batch_size", batch_size, integer=True)
        check_number("val_fraction", val_fraction, low=0.0, high=0.5, low_inclusive=False)
        check_number("test_fraction", test_fraction, low=0.0, high=0.5, low_inclusive=False)
        check_number("num_workers", num_workers, low=0, integer=True)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_dataset: LabeledTensorDataset | None = None
        self.val_dataset: LabeledTensorDataset | None = None
        self.test_dataset: LabeledTensorDataset | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        x, y = self._load()
        train, val, test = _split(len(y), self.val_fraction, self.test_fraction, self.seed, y.numpy())
        self.train_dataset = LabeledTensorDataset(x[train], y[train])
        self.val_dataset = LabeledTensorDataset(x[val], y[val])
        self.test_dataset = LabeledTensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None
        sampler = epoch_shuffle_sampler(self.train_dataset, seed=self.seed, trainer=self.trainer)
        return ResumableDataLoader(
            self.train_dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, datamodule=self
        )

    def _eval_loader(self, dataset: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=256, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset)


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's handwritten digits: 1,797 8x8 grey images (scaled to [0, 1]), 10 classes, stratified
    seeded train/val/test split. Batches are ``(x [B, 1, 8, 8] float32, y [B] int64)``.

    Args:
        batch_size: train batch size.
        val_fraction: fraction of all samples for validation.
        test_fraction: fraction of all samples for test.
        seed: split and shuffle seed.
        num_workers: DataLoader workers.
        keep_fraction: optional ``{class: fraction}`` that keeps only that fraction of a class's *training* samples
            (an imbalanced version of digits; validation and test keep their natural balance). With ``classes``,
            the keys are digits among ``classes``.
        classes: optional list of digits to keep (at least two, distinct, ``0..9``); their labels are remapped to
            ``0 .. len(classes) - 1`` in the order given and ``num_classes`` becomes ``len(classes)``. For a two-stage
            (transfer / fine-tuning) task: pre-train on ``classes=[0, 1, 2, 3, 4]``, fine-tune on
            ``classes=[5, 6, 7, 8, 9]``. ``None`` (the default): all ten digits, labels unchanged.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
        keep_fraction: dict[int, float] | None = None,
        classes: list[int] | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed, num_workers)
        if classes is not None:
            if not isinstance(classes, (list, tuple)) or len(classes) < 2:
                raise ValueError(f"classes must be None or a list of at least two digits 0..9, got {classes!r}.")
            for digit in classes:
                check_number("classes", digit, low=0, high=9, integer=True)
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes must be distinct digits, got {list(classes)}.")
            self.num_classes = len(classes)
        self.classes = None if classes is None else [int(c) for c in classes]
        for cls, frac in (keep_fraction or {}).items():
            check_number(f"keep_fraction[{cls}]", cls, low=0, high=9, integer=True)
            check_number(f"keep_fraction[{cls}]", frac, low=0.0, high=1.0, low_inclusive=False)
            if self.classes is not None and cls not in self.classes:
                raise ValueError(f"keep_fraction names digit {cls}, which is not among classes={self.classes}.")
        self.keep_fraction = dict(keep_fraction or {})

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        if self.classes is None:
            return x, y
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        keep = remap[y] >= 0
        return x[keep], remap[y[keep]]

    def setup(self, stage: str | None = None) -> None:
        already = self.train_dataset is not None
        super().setup(stage)
        if already or not self.keep_fraction:
            return
        assert self.train_dataset is not None
        y = self.train_dataset.targets
        rng = np.random.default_rng(self.seed)
        keep = np.ones(len(y), dtype=bool)
        for cls, frac in self.keep_fraction.items():
            label = cls if self.classes is None else self.classes.index(cls)
            members = np.flatnonzero(y.numpy() == label)
            n_keep = max(1, int(round(frac * len(members))))
            drop = rng.permutation(members)[n_keep:]
            keep[drop] = False
        mask = torch.from_numpy(keep)
        self.train_dataset = LabeledTensorDataset(self.train_dataset.inputs[mask], y[mask])


class BreastCancerDataModule(_SplitDataModule):
    """scikit-learn's breast-cancer (Wisconsin) set: 569 samples x 30 raw (unscaled) features, 2 classes
    (212 malignant vs 357 benign: imbalanced). Batches are ``(x [B, 30] float32, y [B] int64)``. Features are
    deliberately left unscaled so normalisation techniques have something to do."""

    num_classes = 2
    input_shape = (30,)

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed, num_workers)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        return torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


class TokenPresenceDataModule(_SplitDataModule):
    """Generated token sequences for text-model demos (no download): ``n_samples`` sequences of ``min_length`` to
    ``max_length`` random tokens from ``1 .. vocab_size - 1``, right-padded with ``0`` to ``max_length``; the label is
    1 when ``target_token`` occurs in the sequence (about half of them, by construction). Batches are
    ``(ids [B, max_length] int64, y [B] int64)``; the padding mask is ``ids != 0``.

    Args:
        n_samples: sequences in all (split stratified into train/val/test).
        vocab_size: token ids are ``0`` (padding) to ``vocab_size - 1``.
        max_length: padded length.
        min_length: shortest sequence.
        target_token: the token whose presence is the label.
        batch_size, val_fraction, test_fraction, seed, num_workers: as for :class:`DigitsDataModule`.
    """

    num_classes = 2

    def __init__(
        self,
        n_samples: int = 1024,
        vocab_size: int = 40,
        max_length: int = 12,
        min_length: int = 4,
        target_token: int = 7,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed, num_workers)
        check_number("n_samples", n_samples, low=20, integer=True)
        check_number("vocab_size", vocab_size, low=3, integer=True)
        check_positive("max_length", max_length, integer=True)
        check_number("min_length", min_length, low=1, high=max_length, integer=True)
        check_number("target_token", target_token, low=1, high=vocab_size - 1, integer=True)
        self.n_samples = n_samples
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.min_length = min_length
        self.target_token = target_token
        self.input_shape = (max_length,)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        n, length = self.n_samples, self.max_length
        others = torch.tensor([t for t in range(1, self.vocab_size) if t != self.target_token])
        ids = others[torch.randint(len(others), (n, length), generator=g)]
        lengths = torch.randint(self.min_length, length + 1, (n,), generator=g)
        labels = (torch.rand(n, generator=g) < 0.5).long()
        where = (torch.rand(n, generator=g) * lengths).long()  # one position inside the sequence
        ids[labels.bool(), where[labels.bool()]] = self.target_token
        ids = ids * (torch.arange(length)[None, :] < lengths[:, None])
        return ids, labels
