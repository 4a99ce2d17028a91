"""Steering which samples the train loader yields, correctly under DDP and across mid-epoch resume.

The problem: under DDP Lightning replaces any custom sampler with ``DistributedSamplerWrapper``, which re-permutes
the indices the custom sampler produced (upstream #21131, #21447), destroying a curriculum's order. Lightning
leaves a sampler alone when it *is* a ``torch.utils.data.DistributedSampler``
(``_requires_distributed_sampler`` in ``trainer/connectors/data_connector.py``).

The mechanism:

* :class:`SteeredSampler` subclasses ``DistributedSampler``. Every epoch it asks a *plan* for the **global** order
  of dataset indices (``plan(epoch) -> sequence of ints``, the same on every rank: plans must be deterministic
  functions of the epoch and their own seeded state), pads it to a multiple of the world size, and gives rank ``r``
  the positions ``r, r + W, r + 2W ...``. Rank ``r``'s ``k``-th batch therefore holds global positions from the
  window of global step ``k``: the ranks draw disjoint shares of the same global draw, in its order.
* :class:`SamplerSteering` installs it: it wraps the fit loop's train-dataloader source so that the loader Lightning
  requests (from the module, the datamodule, or a loader passed to ``fit``) is rebuilt with the steered sampler via
  Lightning's own ``_update_dataloader``. It works with ``reload_dataloaders_every_n_epochs`` and keeps the plan's
  resume position: its :meth:`~SamplerSteering.state_dict` records how many batches of the current epoch were
  consumed (from Lightning's batch progress, so prefetching does not skew it) and, after a resume mid-epoch, the
  sampler yields only the remaining positions of that epoch while reporting the full epoch length (so Lightning's
  epoch accounting is unchanged).

When the plan is called: ``plan(epoch)`` runs when the loader is iterated, i.e. for the first (or resumed) epoch
inside Lightning's ``FitLoop.setup_data()`` - before ``on_train_start`` and ``on_train_epoch_start`` - and for later
epochs at the start of each epoch. Work a plan needs before its first epoch (scoring samples) must therefore run
lazily inside the plan (or in ``setup``). The plan is not told how many optimizer steps preceded its epoch; a
step-paced technique keeps that count in its own state.

A technique owns one :class:`SamplerSteering`, creates it in ``setup(stage="fit")``, includes its state in the
callback's ``state_dict`` and calls :meth:`~SamplerSteering.remove` in ``teardown``. Only one technique can steer the
train sampler of a run; a second raises a clear error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

#: ``plan(epoch) -> global order of dataset indices for that epoch``
Plan = Callable[[int], Sequence[int]]

_ATTR = "_lt_sampler_steering"

# Lightning warns that a mid-epoch checkpoint cannot be resumed exactly unless the loader is stateful; a steered
# sampler resumes exactly (see SamplerSteering), so that one message is silenced for runs that use it.
_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class SteeredSampler(DistributedSampler):
    """A ``DistributedSampler`` whose global order comes from a plan (see the module docstring)."""

    def __init__(self, dataset: Dataset, plan: Plan, epoch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas}).")
        if epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.plan = plan
        self.epoch_size = int(epoch_size)
        self.num_samples = math.ceil(self.epoch_size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._skip: tuple[int, int] | None = None  # (epoch, positions of this rank to skip)

    def resume_at(self, epoch: int, consumed: int) -> None:
        """On the next iteration of ``epoch`` skip this rank's first ``consumed`` positions."""
        self._skip = (epoch, consumed) if consumed > 0 else None

    def global_order(self, epoch: int) -> list[int]:
        order = [int(i) for i in self.plan(epoch)]
        if len(order) != self.epoch_size:
            raise RuntimeError(f"The sampler plan returned {len(order)} indices for epoch {epoch}; expected "
                               f"epoch_size={self.epoch_size}.")
        pad = self.total_size - len(order)
        return order + order[:pad] if pad else order

    def rank_indices(self, epoch: int) -> list[int]:
        return self.global_order(epoch)[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):  # type: ignore[override]
        indices = self.rank_indices(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples


class SamplerSteering:
    """Installs a :class:`SteeredSampler` on the run's train loader (see the module docstring).

    Args:
        trainer: the Trainer (call from a callback's ``setup(stage="fit")``).
        plan_factory: ``plan_factory(dataset, loader) -> (plan, epoch_size)``, called each time Lightning requests
            the train loader, with the user's dataset and original loader.
        owner: the technique's name, for error messages.
    """

    def __init__(self, trainer: Any, plan_factory: Callable[[Dataset, DataLoader], tuple[Plan, int]], owner: str):
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is None:
            raise RuntimeError(f"{owner}: the Trainer has no train dataloader source; call from setup(stage='fit').")
        other = source.__dict__.get(_ATTR)
        if other is not None and other is not self:
            raise RuntimeError(
                f"{owner} and {other.owner} both want to control the train sampler; use one of them per run."
            )
        self.trainer = trainer
        self.owner = owner
        self.plan_factory = plan_factory
        self.sampler: SteeredSampler | None = None
        self.dataset: Dataset | None = None
        self._pending: tuple[int, int] | None = None  # (epoch, batches consumed) from a checkpoint
        self._source = source
        self._original = source.dataloader
        source.__dict__[_ATTR] = self
        source.dataloader = self._dataloader  # instance attribute shadows the dataclass method
        warnings.filterwarnings("ignore", message=_RESUME_WARNING)

    def _dataloader(self) -> Any:
        from lightning.pytorch.utilities.data import _update_dataloader

        loader = self._original()
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"{self.owner} needs the train dataloader to be a single torch DataLoader; got {type(loader).__name__}."
            )
        if loader.batch_size is None:
            raise TypeError(f"{self.owner} needs a DataLoader built with batch_size=..., not a custom batch_sampler.")
        self.dataset = loader.dataset
        plan, epoch_size = self.plan_factory(loader.dataset, loader)
        sampler = SteeredSampler(
            loader.dataset, plan, epoch_size, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank
        )
        epoch = self.trainer.fit_loop.epoch_progress.current.processed
        sampler.set_epoch(epoch)
        if self._pending is not None:
            p_epoch, batches = self._pending
            sampler.resume_at(p_epoch, batches * loader.batch_size)
            self._pending = None
        self.sampler = sampler
        return _update_dataloader(loader, sampler)

    def state_dict(self) -> dict[str, int]:
        """Epoch and number of batches of it already consumed (from Lightning's progress counters)."""
        loop = self.trainer.fit_loop
        return {
            "epoch": int(loop.epoch_progress.current.processed),
            "batches": int(loop.epoch_loop.batch_progress.current.ready),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = (int(state["epoch"]), int(state["batches"]))

    def remove(self) -> None:
        if self._source.__dict__.get(_ATTR) is self:
            del self._source.__dict__[_ATTR]
            if self._source.__dict__.get("dataloader") == self._dataloader:
                del self._source.__dict__["dataloader"]


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on ``seed`` (the same on every rank and every run)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)
