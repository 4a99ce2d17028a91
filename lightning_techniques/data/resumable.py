"""Exact mid-epoch resume for your own data: a shuffling train sampler and a DataLoader that Lightning checkpoints.

What Lightning itself restores from a checkpoint: the weights, the optimizer and LR-scheduler states, the loop
progress counters (epoch, batches, optimizer steps) and every callback's ``state_dict``. What it does **not** restore:

* **the position inside the epoch**. A plain ``DataLoader`` restarts the interrupted epoch from its first batch
  (Lightning warns *"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not
  resumable"*), so after a mid-epoch resume some samples are seen twice in that epoch and others not at all. Lightning
  saves and restores a loader's position only when the loader implements ``state_dict`` / ``load_state_dict``.
* **the shuffle order**. A ``DataLoader(shuffle=True)`` draws each epoch's permutation from the global torch RNG, whose
  state is not in the checkpoint, so a resumed run shuffles differently from a straight one.
* **random-generator states** (dropout masks, random augmentation): use
  :class:`~lightning_techniques.RNGStateCheckpoint` beside this loader when the model or the data pipeline draws
  random numbers.

This module closes the first two gaps:

* :class:`EpochPermutation` is a shuffle whose order for epoch ``e`` is ``randperm(n)`` seeded with ``seed + e``: it
  depends on nothing else (not on the global RNG, not on what ran before).
* :func:`epoch_shuffle_sampler` wraps it in a ``DistributedSampler`` subclass, so Lightning leaves it unwrapped under
  ``strategy="ddp"`` (where each rank takes a disjoint stride of the same global permutation) instead of wrapping it in
  its ``DistributedSamplerWrapper``.
* :class:`ResumableDataLoader` is a ``DataLoader`` that implements ``state_dict`` / ``load_state_dict``: the checkpoint
  records how many batches of the current epoch the loop *consumed* (from Lightning's own progress counters; the
  iterator itself runs ahead because Lightning prefetches a batch), and on resume the sampler skips exactly those.
* :func:`resumable_loader` builds the two together.

Example (in your ``LightningDataModule``)::

    from lightning_techniques.data import resumable_loader

    class MyData(L.LightningDataModule):
        def train_dataloader(self):
            return resumable_loader(self.train_set, batch_size=64, seed=0, owner=self, num_workers=2)

A run resumed from any mid-epoch checkpoint (``trainer.fit(..., ckpt_path=...)``) then sees exactly the batches a
straight run would have seen; with a fixed seed on CPU the weights are bit-identical (``tests/test_demo.py`` checks
it with :func:`~lightning_techniques.testing.assert_exact_resume`).

Limits: the loader must be built with ``batch_size=...`` (not a custom ``batch_sampler``); the dataset's length must not
change between the checkpoint and the resume; with ``num_workers > 0`` each worker's own random state (e.g. random
augmentation inside ``__getitem__``) is not restored — do random augmentation on the device
(:class:`~lightning_techniques.ImageAugmentation`) with :class:`~lightning_techniques.RNGStateCheckpoint`, or seed it
from the sample index and epoch.
"""

from __future__ import annotations

import numbers
from typing import Any

from torch.utils.data import DataLoader, Dataset

from lightning_techniques._internal.sampling import SteeredSampler, seeded_permutation
from lightning_techniques._internal.validation import check_positive

__all__ = ["EpochPermutation", "ResumableDataLoader", "epoch_shuffle_sampler", "resumable_loader"]


class EpochPermutation:
    """A shuffle plan: epoch ``e``'s order is a permutation of ``range(num_samples)`` seeded with ``seed + e``.

    An epoch's order depends neither on the global RNG nor on what ran before, so a run resumed from a checkpoint
    sees exactly the order a straight run would have seen.

    Args:
        num_samples: the dataset's length.
        seed: base seed; epoch ``e`` uses ``seed + e``.

    Example::

        plan = EpochPermutation(10, seed=0)
        plan(3)   # the order of epoch 3, the same in every process and every run
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        check_positive("num_samples", num_samples, integer=True)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.num_samples: int = int(num_samples)
        self.seed: int = int(seed)

    def __call__(self, epoch: int) -> list[int]:
        return seeded_permutation(self.num_samples, self.seed + epoch).tolist()


def _world(trainer: Any) -> tuple[int, int]:
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


def epoch_shuffle_sampler(dataset: Dataset, seed: int = 0, trainer: Any = None) -> SteeredSampler:
    """A shuffling train sampler that resumes mid-epoch exactly and is a ``torch.utils.data.DistributedSampler``.

    Lightning leaves a ``DistributedSampler`` unwrapped under DDP; this one gives rank ``r`` of ``W`` the positions
    ``r, r + W, ...`` of the epoch's global :class:`EpochPermutation` (padded to a multiple of ``W`` by repeating its
    first samples, as ``DistributedSampler`` does).

    Args:
        dataset: the training dataset (its ``len`` is the epoch size).
        seed: shuffle seed (epoch ``e`` uses ``seed + e``).
        trainer: the Trainer, for the world size and this process's rank (``None``: one process).

    Example::

        sampler = epoch_shuffle_sampler(train_set, seed=0, trainer=self.trainer)
        loader = ResumableDataLoader(train_set, batch_size=64, sampler=sampler, trainer=self.trainer)
    """
    world, rank = _world(trainer)
    n = len(dataset)  # type: ignore[arg-type]
    return SteeredSampler(dataset, EpochPermutation(n, seed), epoch_size=n, num_replicas=world, rank=rank)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning checkpoints, so a run resumed mid-epoch continues the epoch where it stopped.

    It implements ``state_dict`` / ``load_state_dict``, which Lightning saves with the fit loop and gives back on
    resume. The position is read from the Trainer's progress counters (batches *consumed* by the loop), not from the
    iterator, which Lightning's fetcher runs one batch ahead.

    Args:
        *args, **kwargs: as for ``torch.utils.data.DataLoader``; ``batch_size`` and a ``sampler`` that provides
            ``resume_at(epoch, n)`` (:func:`epoch_shuffle_sampler` builds one) are needed for the resume.
        datamodule: the ``LightningDataModule`` (or ``LightningModule``) that builds the loader; its ``.trainer`` is
            read when the checkpoint is written.
        trainer: the Trainer itself, instead of ``datamodule``.

    Example::

        def train_dataloader(self):   # in a LightningDataModule
            sampler = epoch_shuffle_sampler(self.train_set, seed=0, trainer=self.trainer)
            return ResumableDataLoader(self.train_set, batch_size=64, sampler=sampler, datamodule=self)

    Limits: without a ``resume_at`` sampler (e.g. ``shuffle=True``) the saved position is ignored on resume and the
    epoch restarts, as with a plain ``DataLoader``; one train loader per run (several loaders are each restored, but
    from the same counters).
    """

    def __init__(self, *args: Any, datamodule: Any = None, trainer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule
        self.trainer = trainer  # kept as a public attribute: Lightning re-instantiates loaders from their attributes

    def _get_trainer(self) -> Any:
        if self.trainer is not None:
            return self.trainer
        try:
            return getattr(self.datamodule, "trainer", None)
        except RuntimeError:  # a LightningModule not attached to a Trainer raises on .trainer
            return None

    def state_dict(self) -> dict[str, int]:
        trainer = self._get_trainer()
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        loop = trainer.fit_loop
        return {"epoch": int(loop.epoch_progress.current.processed),
                "batches": int(loop.epoch_loop.batch_progress.current.ready)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        resume_at = getattr(self.sampler, "resume_at", None)
        if resume_at is not None and self.batch_size is not None:
            resume_at(int(state_dict["epoch"]), int(state_dict["batches"]) * self.batch_size)


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: int = 0, owner: Any = None, trainer: Any = None, **loader_kwargs: Any
) -> ResumableDataLoader:
    """A shuffling train loader that resumes mid-epoch exactly: :func:`epoch_shuffle_sampler` +
    :class:`ResumableDataLoader`.

    Args:
        dataset: the training dataset.
        batch_size: batch size.
        seed: shuffle seed (epoch ``e`` uses ``seed + e``).
        owner: the ``LightningDataModule`` / ``LightningModule`` whose ``train_dataloader`` builds the loader (its
            ``.trainer`` gives the rank and the progress counters).
        trainer: the Trainer, instead of ``owner``.
        **loader_kwargs: other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ``pin_memory`` ...);
            ``shuffle`` and ``sampler`` are not allowed (the sampler is this function's).

    Example::

        def train_dataloader(self):
            return resumable_loader(self.train_set, batch_size=64, seed=0, owner=self)
    """
    check_positive("batch_size", batch_size, integer=True)
    for key in ("shuffle", "sampler", "batch_sampler"):
        if key in loader_kwargs:
            raise ValueError(f"resumable_loader sets the sampler itself; do not pass {key}=.")
    if trainer is None and owner is not None:
        try:
            trainer = getattr(owner, "trainer", None)
        except RuntimeError:
            trainer = None
    sampler = epoch_shuffle_sampler(dataset, seed=seed, trainer=trainer)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, datamodule=owner, trainer=trainer, **loader_kwargs
    )
