"""Exact-resume check: N steps straight vs. N/2 steps + checkpoint + resume for N/2, in one call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

_SKIP_STATE_KEYS = ("time", "_time", "elapsed")


def _to_comparable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_comparable(v) for k, v in value.items() if str(k) not in _SKIP_STATE_KEYS}
    if isinstance(value, (list, tuple)):
        return [_to_comparable(v) for v in value]
    return value


def assert_same(a: Any, b: Any, path: str = "", atol: float = 0.0) -> None:
    """Recursive equality of nested dicts/lists/tensors (bit-exact when ``atol == 0``); raises AssertionError
    naming the first differing path."""
    a, b = _to_comparable(a), _to_comparable(b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if atol == 0.0:
            same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a.nan_to_num(), b.nan_to_num()))
            assert same, f"{path}: tensors differ (max abs diff {(a.double() - b.double()).abs().max().item():.3g})"
        else:
            assert torch.allclose(a.double(), b.double(), atol=atol, rtol=0.0, equal_nan=True), f"{path}: not close"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{path}: keys differ: {sorted(map(str, set(a) ^ set(b)))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}" if path else str(key), atol)
        return
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lists differ in length or type"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", atol)
        return
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # both NaN
        return
    assert a == b, f"{path}: {a!r} != {b!r}"


class _SaveAtStep(Callback):
    """Saves a checkpoint at the end of the training batch that completes ``step`` optimizer steps - where a
    ``ModelCheckpoint(every_n_train_steps=...)`` or a crash-recovery checkpoint would be written."""

    def __init__(self, step: int, path: str) -> None:
        self.step = step
        self.path = path
        self.saved = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # every rank calls save_checkpoint (it is collective under DDP); rank 0 writes the file
        if trainer.global_step == self.step and not self.saved:
            trainer.save_checkpoint(self.path)
            self.saved = True


def _callback_states(callbacks: Sequence[Callback]) -> dict[str, Any]:
    return {cb.state_key: cb.state_dict() for cb in callbacks}


def assert_exact_resume(
    make_module: Callable[[], L.LightningModule],
    make_datamodule: Callable[[], L.LightningDataModule],
    make_callbacks: Callable[[], list[Callback]],
    tmp_path: str | Path,
    total_steps: int = 8,
    split_step: int | None = None,
    seed: int = 0,
    atol: float = 0.0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    compare_state: bool = True,
    make_plugins: Callable[[], Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Train ``total_steps`` straight; train ``split_step`` (default half) with a checkpoint written at the end of
    that step's batch (as ``ModelCheckpoint(every_n_train_steps=...)`` does, so ``split_step`` may fall mid-epoch),
    resume in fresh objects to ``total_steps`` (loading with ``weights_only=True``); assert identical module
    weights and identical callback states.

    Every object is built fresh by the factories (as a new process would); ``make_plugins`` builds the Trainer's
    ``plugins`` (e.g. a precision plugin) fresh for each run. ``trainer_kwargs`` are added to both
    Trainers (e.g. ``precision``, ``accumulate_grad_batches``, ``val_check_interval``). Returns the straight run's
    ``{"module": ..., "callbacks": [...], "trainer": ...}`` for further assertions.

    The first-half run stops through ``max_steps=split_step``: a technique that derives a length from
    ``trainer.max_steps`` must be given that length explicitly in the test (or keep the value it resolved in its
    checkpoint state, which is what a resumed user run needs anyway).

    Lightning semantics to keep in mind when choosing ``split_step``: a validation due right after the split batch
    (``val_check_interval``) is skipped by Lightning on resume, as it is for any ``ModelCheckpoint`` written at a
    training-batch end; and a step-interval hook that would run after the batch reaching ``max_steps`` never runs.
    Choose a split away from validations and epoch ends. Under DDP pass ``strategy``/``devices`` in
    ``trainer_kwargs`` and a ``tmp_path`` that every rank sees.
    """
    tmp_path = Path(tmp_path)  # under DDP: a directory every rank sees (the checkpoint is read by all ranks)
    split = total_steps // 2 if split_step is None else split_step
    if not 0 < split < total_steps:
        raise ValueError(f"split_step={split} must be in (0, total_steps={total_steps}).")
    base: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    base.update(trainer_kwargs or {})
    shared_root = base.pop("default_root_dir", None)  # one directory for all three runs when given

    def run(max_steps: int, root: str, ckpt_path: str | None = None, save: str | None = None) -> dict[str, Any]:
        L.seed_everything(seed, verbose=False)
        module, datamodule, callbacks = make_module(), make_datamodule(), make_callbacks()
        extra: list[Callback] = [_SaveAtStep(split, save)] if save is not None else []
        plugins = list(make_plugins()) if make_plugins is not None else None
        trainer = L.Trainer(
            max_steps=max_steps, default_root_dir=str(shared_root or tmp_path / root), callbacks=callbacks + extra,
            plugins=plugins or None, **base
        )
        # the checkpoint is loaded the safe way (ARCHITECTURE.md section 7): technique state must be plain data
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
        return {"module": module, "callbacks": callbacks, "trainer": trainer}

    straight = run(total_steps, "straight")
    ckpt = str(tmp_path / "half.ckpt")
    run(split, "first_half", save=ckpt)
    assert Path(ckpt).exists(), f"no checkpoint was written at step {split}"
    resumed = run(total_steps, "resumed", ckpt_path=ckpt)

    assert straight["trainer"].global_step == resumed["trainer"].global_step == total_steps, (
        f"global_step: straight {straight['trainer'].global_step}, resumed {resumed['trainer'].global_step}, "
        f"expected {total_steps}"
    )
    assert_same(straight["module"].state_dict(), resumed["module"].state_dict(), "module", atol)
    if compare_state:
        assert_same(_callback_states(straight["callbacks"]), _callback_states(resumed["callbacks"]), "callbacks", atol)
    return straight
