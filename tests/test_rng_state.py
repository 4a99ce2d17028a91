"""RNGStateCheckpoint: generator states round-trip, exact resume with dropout (and not without it), numpy/Python
draws continue, weights_only loading, world-size change, bad input, DDP per-rank restore."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_techniques import RNGStateCheckpoint
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.reproducibility.rng_state import (
    apply_rng_states,
    collect_rng_states,
    derived_seed,
    reseed_rng,
)
from lightning_techniques.testing import assert_exact_resume, assert_same, run_ddp_script

DDP_SCRIPT = Path(__file__).parent / "ddp" / "ddp_rng.py"


class DropoutDigits(DigitsCNN):
    """DigitsCNN with ``nn.Dropout(0.5)`` before the head; each training step also draws from numpy and ``random``
    (as augmentation code does) and records the draws by global step."""

    def __init__(self) -> None:
        super().__init__(channels=4)
        self.dropout = nn.Dropout(0.5)
        self.draws: dict[int, tuple[float, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.draws[self.global_step] = (float(np.random.rand()), random.random())
        return super().training_step(batch, batch_idx)


def _draws() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    return torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]


# ---------------------------------------------------------------------------------------------------- functional core
def test_collect_and_apply_round_trip_every_generator() -> None:
    reseed_rng(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    states = collect_rng_states()
    first = _draws() + (np.random.randn(), random.gauss(0, 1))
    reseed_rng(99)
    assert not torch.equal(_draws()[0], first[0])
    apply_rng_states(states)
    again = _draws() + (np.random.randn(), random.gauss(0, 1))
    assert torch.equal(again[0], first[0]) and np.array_equal(again[1], first[1]) and again[2] == first[2]
    assert again[3] == first[3] and again[4] == first[4]


def test_states_are_plain_data_that_loads_with_weights_only(tmp_path: Path) -> None:
    reseed_rng(5)
    states = collect_rng_states()
    expected = _draws()
    path = tmp_path / "rng.pt"
    torch.save(states, path)
    loaded = torch.load(path, weights_only=True)
    reseed_rng(6)
    apply_rng_states(loaded)
    got = _draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_reseed_and_derived_seed_are_deterministic_and_per_rank() -> None:
    reseed_rng(0)
    states = collect_rng_states()
    assert derived_seed(states, 0) == derived_seed(states, 0) != derived_seed(states, 1)
    reseed_rng(derived_seed(states, 1))
    a = _draws()
    reseed_rng(derived_seed(states, 1))
    b = _draws()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.gpu
def test_cuda_generator_round_trips() -> None:
    torch.cuda.init()
    reseed_rng(7)
    states = collect_rng_states()
    assert len(states["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(8)
    apply_rng_states(states)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert collect_rng_states(include_cuda=False)["cuda"] == []


# ---------------------------------------------------------------------------------------------------- exact resume
def _resume(tmp_path: Path, callbacks: Any, total: int = 10, split: int = 4, **trainer_kwargs: Any) -> list:
    modules: list[DropoutDigits] = []

    def make() -> DropoutDigits:
        modules.append(DropoutDigits())
        return modules[-1]

    kwargs = dict(limit_train_batches=6, limit_val_batches=1)
    kwargs.update(trainer_kwargs)
    assert_exact_resume(make, DigitsDataModule, callbacks, tmp_path, total_steps=total, split_step=split,
                        trainer_kwargs=kwargs)
    return modules  # straight, first half, resumed


def test_dropout_resume_is_exact_with_the_callback(tmp_path: Path) -> None:
    # split mid-epoch (step 4 of 6), the resumed run crosses an epoch end and a validation
    straight, _, resumed = _resume(tmp_path, lambda: [RNGStateCheckpoint()])
    assert {s: straight.draws[s] for s in resumed.draws} == resumed.draws and min(resumed.draws) == 4


class NoisyBatchDigits(DigitsCNN):
    """No dropout: random augmentation drawn from torch's global generator in the module's own
    ``on_after_batch_transfer`` (before any callback hook of the batch)."""

    def __init__(self) -> None:
        super().__init__(channels=4)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.trainer.training:
            x = x + 0.3 * torch.randn_like(x)
        return x, y


@pytest.mark.parametrize("with_callback", [True, False])
def test_augmentation_in_batch_transfer_hook_resumes_exactly(tmp_path: Path, with_callback: bool) -> None:
    def run() -> None:
        assert_exact_resume(NoisyBatchDigits, DigitsDataModule, lambda: [RNGStateCheckpoint()] if with_callback else [],
                            tmp_path, total_steps=8, split_step=3,
                            trainer_kwargs=dict(limit_train_batches=5, limit_val_batches=1))

    if with_callback:
        run()
    else:
        with pytest.raises(AssertionError, match="tensors differ"):
            run()


def test_dropout_resume_is_not_exact_without_it(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="tensors differ"):
        _resume(tmp_path, lambda: [])


def test_numpy_and_python_draws_continue_identically(tmp_path: Path) -> None:
    """Without the callback the numpy/Python draws after the resume repeat the ones after the seed; with it they
    continue the straight run's sequence."""
    straight, _, resumed = _resume(tmp_path / "with", lambda: [RNGStateCheckpoint()], total=6, split=3)
    assert [resumed.draws[s] for s in (3, 4, 5)] == [straight.draws[s] for s in (3, 4, 5)]
    with pytest.raises(AssertionError):
        _resume(tmp_path / "without", lambda: [], total=6, split=3)


def test_checkpoint_after_the_last_batch_of_an_epoch_resumes_exactly(tmp_path: Path) -> None:
    """The resumed run's loader iterator of the next epoch exists before the restore: it is created again after it
    (without that its seed draw shifts every later dropout mask)."""
    straight, _, resumed = _resume(tmp_path, lambda: [RNGStateCheckpoint()], total=9, split=6, limit_val_batches=0)
    assert min(resumed.draws) == 6


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_epoch_bound_run_resumes_exactly(tmp_path: Path, trainer_kwargs: dict, where: str) -> None:
    """A run bound by max_epochs, checkpointed by ModelCheckpoint mid-epoch (every_n_train_steps=7) or at the end of
    epoch 1 after its validation (every_n_epochs=1, the default cadence), and resumed."""
    trainer_kwargs.update(limit_train_batches=5, limit_val_batches=1, deterministic=True)
    every = dict(every_n_train_steps=7) if where == "mid_epoch" else dict(every_n_epochs=1)
    name = "epoch=1-step=7.ckpt" if where == "mid_epoch" else "epoch=1-step=10.ckpt"

    def run(root: str, max_epochs: int, ckpt: str | None = None, save: bool = False) -> tuple[Any, Any]:
        L.seed_everything(0, verbose=False)
        module, rng = DropoutDigits(), RNGStateCheckpoint()
        callbacks: list = [rng]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, **every))
        trainer = L.Trainer(max_epochs=max_epochs, default_root_dir=str(tmp_path / root), callbacks=callbacks,
                            **{**trainer_kwargs, "enable_checkpointing": save})
        trainer.fit(module, datamodule=DigitsDataModule(), ckpt_path=ckpt, weights_only=True if ckpt else None)
        return module, rng

    straight, _ = run("straight", 3)
    run("first", 2, save=True)
    ckpt = tmp_path / "ckpt" / name
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, rng = run("resumed", 3, ckpt=str(ckpt))
    assert rng.restored_from == "checkpoint"
    assert_same(straight.state_dict(), resumed.state_dict())
    assert {s: straight.draws[s] for s in resumed.draws} == resumed.draws


def test_checkpoint_loads_with_weights_only_and_holds_plain_states(tmp_path: Path, trainer_kwargs: dict) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[RNGStateCheckpoint()], **trainer_kwargs)
    trainer.fit(DropoutDigits(), datamodule=DigitsDataModule())
    path = tmp_path / "rng.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["RNGStateCheckpoint"]
    assert state["world_size"] == 1 and set(state["states"]) == {0}
    expected = _draws()  # the process's generators were not touched since the save
    reseed_rng(1)
    apply_rng_states(state["states"][0])
    got = _draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_changed_world_size_warns_and_reseeds_deterministically(tmp_path: Path) -> None:
    reseed_rng(0)
    saved = {"format": 1, "world_size": 2, "states": {0: collect_rng_states(), 1: collect_rng_states()}}

    def resume_draws() -> tuple:
        cb = RNGStateCheckpoint()
        cb.load_state_dict(saved)
        with pytest.warns(UserWarning, match="written by 2 rank"):
            cb.on_train_start(None, None)
        assert cb.restored_from == "reseed"
        return _draws()

    a, b = resume_draws(), resume_draws()
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    strict = RNGStateCheckpoint(strict_world_size=True)
    strict.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="written by 2 rank"):
        strict.on_train_start(None, None)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="include_cuda must be True or False"):
        RNGStateCheckpoint(include_cuda="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="strict_world_size must be True or False"):
        RNGStateCheckpoint(strict_world_size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not written by it"):
        RNGStateCheckpoint().load_state_dict({"torch": torch.get_rng_state()})


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_each_rank_restores_its_own_generators(tmp_path: Path) -> None:
    results = run_ddp_script(DDP_SCRIPT, tmp_path)
    for rank, result in enumerate(results):
        assert result["rank"] == rank
        assert result["restored_from"] == "checkpoint"
        assert result["straight_draws"] == result["resumed_draws"], f"rank {rank}: draws differ after the resume"
        assert sorted(result["checkpoint_ranks"]) == [0, 1]
    # each rank drew differently (its own generator), and the checkpoint held each rank's own state
    assert results[0]["straight_draws"] != results[1]["straight_draws"]
    assert not torch.equal(results[0]["saved_torch_state"], results[1]["saved_torch_state"])
    assert_same(results[0]["weights"], results[1]["weights"])
