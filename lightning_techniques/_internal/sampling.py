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

A technique keeps one :class:`SamplerSteering` for its lifetime (or subclasses :class:`SteeringCallback`, which does
all of this for it): ``install`` in ``setup(stage="fit")``, its ``state_dict`` inside the callback's state, ``remove``
in ``teardown`` and ``on_exception``. Only one technique can steer the train sampler of a run; a second raises a clear
error (and :func:`~lightning_techniques._internal.conflicts.check_conflicts` refuses the pair in ``setup`` already).

A loader built but never iterated (Lightning's ``estimated_stepping_batches`` or a technique counting batches before
the loop state is restored) does not use up the restored position: every loader built before the resumed epoch
starts gets it, and the first iteration of that epoch clears it. Lightning's "dataloader is not resumable" warning is
silenced only inside the epoch loop's reset and only while a steering is installed (no process-wide filter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.patching import undo_at_run_end

#: ``plan(epoch) -> global order of dataset indices for that epoch``
Plan = Callable[[int], Sequence[int]]

_ATTR = "_lt_sampler_steering"


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
        self._on_resumed: Callable[[], None] | None = None

    def resume_at(self, epoch: int, consumed: int, on_resumed: Callable[[], None] | None = None) -> None:
        """On the next iteration of ``epoch`` skip this rank's first ``consumed`` positions (then call
        ``on_resumed``; a later call without one - e.g. a resumable DataLoader restoring the same position - keeps
        it)."""
        self._skip = (epoch, max(int(consumed), 0))
        if on_resumed is not None:
            self._on_resumed = on_resumed

    def global_order(self, epoch: int) -> list[int]:
        order = [int(i) for i in self.plan(epoch)]
        if len(order) != self.epoch_size:
            raise RuntimeError(f"The sampler plan returned {len(order)} indices for epoch {epoch}; expected "
                               f"epoch_size={self.epoch_size}.")
        pad = self.total_size - len(order)
        return order + order[:pad] if pad else order

    def rank_indices(self, epoch: int) -> list[int]:
        return self.global_order(epoch)[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):
        indices = self.rank_indices(self.epoch)
        if self._skip is not None:
            # the first iteration after a resume: the resumed epoch skips what was consumed; any other epoch (the
            # checkpoint was written at an epoch's end) starts from its beginning. Either way the position is used.
            if self._skip[0] == self.epoch:
                indices = indices[self._skip[1] :]
            self._skip = None
            if self._on_resumed is not None:
                self._on_resumed()
                self._on_resumed = None
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples


class SamplerSteering:
    """Installs a :class:`SteeredSampler` on the run's train loader and keeps its resume position (see the module
    docstring).

    A technique keeps ONE instance for its lifetime: :meth:`install` in ``setup(stage="fit")``, :meth:`remove` in
    ``teardown`` *and* ``on_exception`` (idempotent), and :meth:`state_dict` / :meth:`load_state_dict` in its own
    checkpoint state - they work whether or not the steering is installed (after ``fit`` the last position is kept,
    so a ``trainer.save_checkpoint`` after ``fit`` still resumes exactly). Passing ``trainer`` to the constructor
    installs at once.

    Args:
        trainer: the Trainer to install on now (or None, then call :meth:`install`).
        plan_factory: ``plan_factory(dataset, loader) -> (plan, epoch_size)``, called each time Lightning requests
            the train loader, with the user's dataset and original loader.
        owner: the technique's name, for error messages.
    """

    def __init__(
        self,
        trainer: Any = None,
        plan_factory: Callable[[Dataset, DataLoader], tuple[Plan, int]] | None = None,
        owner: str = "sampler steering",
    ) -> None:
        if plan_factory is None:
            raise TypeError(f"{owner}: SamplerSteering needs plan_factory=(dataset, loader) -> (plan, epoch_size).")
        self.owner = owner
        self.plan_factory = plan_factory
        self.trainer: Any = None
        self.sampler: SteeredSampler | None = None
        self.dataset: Dataset | None = None
        self._pending: tuple[int, int] | None = None  # (epoch, batches consumed) from a checkpoint, not yet resumed
        self._kept: dict[str, int] | None = None  # the position while not installed (after a run, or loaded before)
        self._source: Any = None
        self._original: Any = None
        self._quiet: Any = None
        if trainer is not None:
            self.install(trainer)

    @property
    def installed(self) -> bool:
        return self._source is not None

    def install(self, trainer: Any) -> None:
        """Steer ``trainer``'s train loader (call from ``setup(stage="fit")``); a checkpoint's position arrives
        afterwards through :meth:`load_state_dict`."""
        from lightning_techniques._internal.compat import quiet_mid_epoch_resume_warning, train_data_source

        if self.installed:
            if self.trainer is trainer:
                return
            self.remove()
        source = train_data_source(trainer)
        if source is None:
            raise RuntimeError(f"{self.owner}: the Trainer has no train dataloader source; call from "
                               "setup(stage='fit').")
        other = source.__dict__.get(_ATTR)
        if other is not None and other is not self:
            raise RuntimeError(
                f"{self.owner} and {other.owner} both want to control the train sampler; use one of them per run."
            )
        self.trainer = trainer
        self.sampler = None
        self._pending = None
        self._kept = None
        self._source = source
        self._original = source.dataloader
        source.__dict__[_ATTR] = self
        source.dataloader = self._dataloader  # instance attribute shadows the dataclass method
        # a steered sampler resumes exactly: Lightning's "dataloader not resumable" warning would be wrong here
        self._quiet = quiet_mid_epoch_resume_warning(trainer, lambda: True)
        undo_at_run_end(trainer, self.remove)  # also removed when the run fails (no teardown then)

    def _dataloader(self) -> Any:
        from lightning_techniques._internal.compat import fit_progress, update_dataloader

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
        sampler.set_epoch(fit_progress(self.trainer)[0])
        if self._pending is not None:
            # Every loader built before the resumed epoch is iterated gets the skip (a loader built only to count
            # batches, and then dropped, must not use it up); the first iteration of that epoch clears it.
            p_epoch, batches = self._pending
            sampler.resume_at(p_epoch, batches * loader.batch_size, on_resumed=self._resumed)
        self.sampler = sampler
        return update_dataloader(loader, sampler)

    def _resumed(self) -> None:
        self._pending = None

    def state_dict(self) -> dict[str, int] | None:
        """Epoch and number of batches of it already consumed (from Lightning's progress counters); None before
        any run."""
        if not self.installed:
            return None if self._kept is None else dict(self._kept)
        if self._pending is not None:  # restored but not resumed yet: the restored position is still the position
            return {"epoch": self._pending[0], "batches": self._pending[1]}
        from lightning_techniques._internal.compat import fit_progress

        epoch, batches = fit_progress(self.trainer)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if state is None:
            return
        if self.installed:
            self._pending = (int(state["epoch"]), int(state["batches"]))
        else:
            self._kept = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def remove(self) -> None:
        """Stop steering (idempotent); the position is kept for :meth:`state_dict`."""
        if not self.installed:
            return
        self._kept = self.state_dict()
        source = self._source
        if source.__dict__.get(_ATTR) is self:
            del source.__dict__[_ATTR]
        if source.__dict__.get("dataloader") == self._dataloader:
            del source.__dict__["dataloader"]
        if self._quiet is not None:
            self._quiet.restore()
            self._quiet = None
        self._source = self._original = None
        self.trainer = None
        self._pending = None


class SteeringCallback(LeanHooks, Callback):
    """Base of a technique that steers the train sampler: it owns the steering's install (in ``setup``), its resume
    position (``sampler_state`` / ``load_sampler_state``, to put in the technique's checkpoint state) and its removal
    (``teardown`` and ``on_exception``), and refuses a second sampler-steering technique in ``setup``. A subclass
    implements :meth:`_plan_factory` and states what it does; it may extend ``setup`` (checks first, then
    ``super().setup(...)``)."""

    takes_over: frozenset[str] = frozenset({"train_sampler"})
    conflicts_with: tuple[str, ...] = ()

    def _plan_factory(self, dataset: Dataset, loader: DataLoader) -> tuple[Plan, int]:
        raise NotImplementedError

    @property
    def steering(self) -> SamplerSteering:
        """The technique's :class:`SamplerSteering` (one for its lifetime)."""
        steering = self.__dict__.get("_sampler_steering")
        if steering is None:
            steering = SamplerSteering(None, self._plan_factory, owner=type(self).__name__)
            self.__dict__["_sampler_steering"] = steering
        return steering

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        self.steering.install(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.steering.remove()  # (a failed run: the mechanism's own clean-up removes it)

    def sampler_state(self) -> dict[str, int] | None:
        return self.steering.state_dict()

    def load_sampler_state(self, state: dict[str, int] | None) -> None:
        self.steering.load_state_dict(state)


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on ``seed`` (the same on every rank and every run)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)
