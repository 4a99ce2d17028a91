"""Exact resume of random draws: every rank's torch / CUDA / numpy / Python generator states in the checkpoint.

Lightning's checkpoints hold no random-generator state, so after a resume dropout masks, random augmentation and any
``torch.rand`` / ``np.random`` / ``random`` call take other draws than the uninterrupted run would have.
"""

from __future__ import annotations

import random
import warnings
import zlib
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_techniques._internal.distributed import is_distributed
from lightning_techniques._internal.lean_hooks import LeanHooks

_FORMAT = 1


# ---------------------------------------------------------------------------------------------------- functional core
def collect_rng_states(include_cuda: bool = True) -> dict[str, Any]:
    """This process's global generator states as plain data that ``torch.load(weights_only=True)`` accepts.

    Keys: ``"torch"`` (the CPU generator, a uint8 tensor), ``"cuda"`` (one uint8 tensor per visible CUDA device,
    empty when CUDA is unavailable or not initialised yet - then nothing was drawn on it), ``"numpy"`` (numpy's
    legacy global ``RandomState``: ``algorithm``, ``keys`` as an int64 tensor, ``pos``, ``has_gauss``,
    ``cached_gaussian``) and ``"python"`` (``random``'s state: ``version``, ``state`` as an int64 tensor, ``gauss``).
    """
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, py_state, gauss = random.getstate()
    cuda: list[torch.Tensor] = []
    if include_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [state.clone() for state in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }


def apply_rng_states(states: dict[str, Any]) -> None:
    """Set this process's global generators from :func:`collect_rng_states` output (the inverse, bit for bit).

    CUDA states are applied to as many devices as both the states and this machine have; a different device count
    is reported with a warning.
    """
    torch.set_rng_state(states["torch"].to(dtype=torch.uint8, device="cpu"))
    cuda = list(states.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(
                f"RNGStateCheckpoint: the checkpoint holds CUDA generator states for {len(cuda)} device(s), this "
                f"process sees {count}; restoring the first {min(len(cuda), count)}.",
                stacklevel=2,
            )
        for index, state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(state.to(dtype=torch.uint8, device="cpu"), device=index)
    npy = states["numpy"]
    np.random.set_state(
        (npy["algorithm"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
         float(npy["cached_gaussian"]))
    )
    py = states["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def reseed_rng(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global generator and ``random`` from one integer."""
    seed = int(seed) % 2**32
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(states: dict[str, Any], rank: int) -> int:
    """A seed that depends only on saved per-rank ``states`` (rank 0's CPU torch state) and ``rank``: the same
    checkpoint reseeds the same way every time, and every rank differently."""
    digest = zlib.crc32(states["torch"].to(torch.uint8).numpy().tobytes())
    return (digest + 1_000_003 * (int(rank) + 1)) % 2**32


# ---------------------------------------------------------------------------------------------------- Lightning adapter
class RNGStateCheckpoint(LeanHooks, Callback):
    """Saves every rank's random-generator states (torch CPU, CUDA, numpy, Python ``random``) in the checkpoint and
    restores them on resume, so dropout, random augmentation and any other random draw continue exactly as in an
    uninterrupted run.

    Source: PyTorch's reproducibility notes (https://pytorch.org/docs/stable/notes/randomness.html: each library's
    generator must be seeded / restored separately); Hugging Face Transformers' ``Trainer`` saves the same four states
    per process (``rng_state_{rank}.pth``) for the same reason. Lightning's checkpoints hold none of them.

    What it does: when a checkpoint is written, each rank's states are collected (under DDP they are gathered from
    every rank with ``all_gather_object``, because Lightning saves callback state from rank 0 only) and stored as
    plain tensors / ints / floats, so the checkpoint loads with ``torch.load(weights_only=True)``. On resume each rank
    sets its own generators back in ``on_train_start``: after Lightning's restore, after ``seed_everything`` and the
    user's ``setup`` / ``on_fit_start`` code, after the sanity check and after the resumed run has created its
    train-loader iterator (which draws a seed from torch's generator), and before the first batch is fetched.

    Args:
        include_cuda: also save and restore the CUDA generators (of every visible device, when CUDA is initialised).
        strict_world_size: raise instead of reseeding when the checkpoint was written by a different number of ranks.
            By default a changed world size warns and reseeds every rank deterministically from the checkpoint (a run
            resumed on another number of devices cannot reproduce the original draws anyway).

    Example::

        trainer = L.Trainer(callbacks=[RNGStateCheckpoint(), ModelCheckpoint(every_n_train_steps=100)])
        trainer.fit(model, datamodule=dm, ckpt_path="last.ckpt")   # dropout masks continue where they stopped

    Limits: exact for a resume in the middle of an epoch (where crash-recovery checkpoints are written) with a sized
    train loader, and for one written at the end of an epoch (``ModelCheckpoint``'s default): then the train-loader
    iterator Lightning created before the restore is created again after it (a resume at an epoch boundary starts the
    loader's worker processes twice). Randomness inside DataLoader *worker processes* mid-epoch (their seeds come
    from the iterator that the uninterrupted run created earlier) is not covered, nor are generators the user creates
    (``torch.Generator()``, ``np.random.default_rng()``), nor draws made by hooks between the checkpoint and the next
    batch that Lightning skips on resume (a validation due right after a mid-epoch checkpoint). XLA / MPS generators
    are not saved.
    """

    def __init__(self, include_cuda: bool = True, strict_world_size: bool = False) -> None:
        for name, value in (("include_cuda", include_cuda), ("strict_world_size", strict_world_size)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
        self.include_cuda = include_cuda
        self.strict_world_size = strict_world_size
        self._strategy: Any = None
        self._rank = 0
        self._world_size = 1
        self._pending: dict[str, Any] | None = None
        self.restored_from: str | None = None  # "checkpoint" or "reseed" after a resume, for the user to inspect

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # a second instance is refused by Lightning itself (two stateful callbacks with one state_key)
        self._strategy = trainer.strategy
        self._rank = int(trainer.global_rank)
        self._world_size = int(trainer.world_size)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self._restore(pending)
        self._recreate_train_iterator_at_epoch_boundary(trainer)

    def _recreate_train_iterator_at_epoch_boundary(self, trainer: Any) -> None:
        """A checkpoint written after the last batch of an epoch resumes into a fresh epoch whose loader iterator
        Lightning already created (``FitLoop.setup_data``) - before this restore, so its seed was drawn from the
        generators the restore then replaced; the uninterrupted run creates that iterator *after* the checkpoint
        (``TrainingEpochLoop.on_run_start``). Creating it again here draws its seed from the restored generators, as
        the uninterrupted run did. Mid-epoch the uninterrupted run's iterator predates the checkpoint: nothing to do.
        """
        fit_loop = getattr(trainer, "fit_loop", None)
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fit_loop is None or fetcher is None or not fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        iter(fetcher)  # the same call Lightning makes at every later epoch start

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._pending = None
        self._strategy = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's states (``{"states": {rank: ...}}``); the checkpoint gets every rank's (``on_save_checkpoint``)."""
        return {
            "format": _FORMAT,
            "world_size": self._world_size,
            "states": {self._rank: collect_rng_states(self.include_cuda)},
        }

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Lightning calls state_dict() and then this hook on every rank while saving, and writes rank 0's dict: the
        # per-rank states captured by state_dict() are gathered here, a collective every rank reaches.
        ours = checkpoint.get("callbacks", {}).get(self.state_key)
        if ours is None or not is_distributed(trainer.strategy):
            return
        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, ours["states"][self._rank])
        ours["states"] = dict(enumerate(gathered))
        ours["world_size"] = trainer.world_size

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "states" not in state_dict:
            raise ValueError("RNGStateCheckpoint: the checkpoint's state has no 'states'; it was not written by it.")
        self._pending = state_dict  # applied in on_train_start, right before the first resumed batch

    def _restore(self, saved: dict[str, Any]) -> None:
        states = {int(k): v for k, v in saved["states"].items()}
        saved_world = int(saved.get("world_size", len(states)))
        if saved_world == self._world_size and self._rank in states:
            apply_rng_states(states[self._rank])
            self.restored_from = "checkpoint"
            return
        reason = (
            f"the checkpoint was written by {saved_world} rank(s), this run has {self._world_size}"
            if saved_world != self._world_size
            else f"the checkpoint holds no generator state for rank {self._rank}"
        )
        if self.strict_world_size:
            raise RuntimeError(f"RNGStateCheckpoint: {reason}; cannot restore each rank's generators.")
        rank_zero_warn(
            f"RNGStateCheckpoint: {reason}, so the random draws cannot continue exactly; every rank is reseeded "
            "deterministically from the checkpoint instead (pass strict_world_size=True to make this an error)."
        )
        reseed_rng(derived_seed(states[min(states)], self._rank))
        self.restored_from = "reseed"
