"""Contract helpers beyond the ``max_steps`` resume check: exact resume of a ``max_epochs``-bounded run killed
mid-epoch, and the "module untouched" fingerprint.

Public, like the rest of :mod:`lightning_techniques.testing`, so users can hold their own callbacks to the same
contract.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques.testing.resume import _callback_states, assert_same

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_PLAIN = (int, float, str, bool, type(None))


class SimulatedKill(RuntimeError):
    """Raised by the contract helpers to stop a run the way a crash or a killed job would."""


def module_fingerprint(module: nn.Module) -> dict[str, Any]:
    """Everything a technique could leave behind on a module, as comparable plain data: the class of every
    submodule, its instance attributes (names, and values when plain), its hooks, parameters (names, shapes,
    dtypes, ``requires_grad``), buffers (names, persistence, dtypes) and train/eval mode, the criterion's options,
    and the ``state_dict`` keys. Values of weights are not included (training changes them)."""
    print_: dict[str, Any] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        attrs = {}
        for key, value in vars(sub).items():
            if key in _HOOK_DICTS or key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                continue
            attrs[key] = value if isinstance(value, _PLAIN) else type(value).__name__
        print_[name or "<root>"] = {
            "class": f"{type(sub).__module__}.{type(sub).__qualname__}",
            "attrs": attrs,
            "hooks": {key: len(getattr(sub, key)) for key in _HOOK_DICTS if getattr(sub, key, None)},
            "params": {k: (tuple(p.shape), str(p.dtype), p.requires_grad) for k, p in sub._parameters.items()
                       if p is not None},
            "buffers": {k: (tuple(b.shape), str(b.dtype), k not in sub._non_persistent_buffers_set)
                        for k, b in sub._buffers.items() if b is not None},
            "training": sub.training,
        }
    print_["<state_dict keys>"] = sorted(module.state_dict().keys())
    return print_


def assert_picklable(module: nn.Module) -> None:
    """``torch.save(module)`` (a whole-module pickle) works: nothing unpicklable was left on it."""
    torch.save(module, io.BytesIO())


def declared_changes(techniques: Sequence[Any]) -> tuple[str, ...]:
    """The module paths that techniques changed on purpose: the ``changed_paths`` of every object whose class
    declares ``changes_module = True`` (fine-tuning adapters, layer swaps), in order, without repeats."""
    paths: list[str] = []
    for technique in techniques:
        if getattr(type(technique), "changes_module", False):
            for path in technique.changed_paths:
                if path not in paths:
                    paths.append(path)
    return tuple(paths)


def _under(key: str, paths: Sequence[str]) -> bool:
    """Whether a fingerprint key / ``state_dict`` key is at or under one of ``paths`` (``""`` is the root)."""
    key = "" if key == "<root>" else key
    return any(key == path or (path and key.startswith(path + ".")) for path in paths)


def without_declared_changes(fingerprint: Mapping[str, Any], changed_paths: Sequence[str]) -> dict[str, Any]:
    """``fingerprint`` without its entries at or under ``changed_paths`` (submodule entries and ``state_dict``
    keys); everything else stays, so comparing the results checks "nothing but the declared change"."""
    kept = {key: value for key, value in fingerprint.items()
            if key == "<state_dict keys>" or not _under(key, changed_paths)}
    if "<state_dict keys>" in kept:
        kept["<state_dict keys>"] = [key for key in kept["<state_dict keys>"]
                                     if not _under(key.rsplit(".", 1)[0] if "." in key else "", changed_paths)]
    return kept


def assert_fingerprints_equal(expected: Mapping[str, Any], got: Mapping[str, Any], what: str = "module",
                              changed_paths: Sequence[str] = ()) -> None:
    """Compare two :func:`module_fingerprint` results, naming the first difference. ``changed_paths`` (see
    :func:`declared_changes`): differences at or under these module paths are allowed - a technique that changes
    the module on purpose declares where - and everything else must be exactly as before."""
    if changed_paths:
        expected, got = without_declared_changes(expected, changed_paths), without_declared_changes(got, changed_paths)
    assert_same(dict(expected), dict(got), what)


class _KillAtStep(Callback):
    """Saves a checkpoint at the end of the batch that completes optimizer step ``step`` (as
    ``ModelCheckpoint(every_n_train_steps=...)`` would) and then kills the run."""

    def __init__(self, step: int, path: str | None) -> None:
        self.step = step
        self.path = path

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            if self.path is not None:
                trainer.save_checkpoint(self.path)
            raise SimulatedKill(f"killed after optimizer step {self.step} (batch {batch_idx})")


def kill_at_step(step: int, checkpoint: str | Path | None = None) -> Callback:
    """A callback that (optionally) checkpoints at the end of optimizer step ``step`` and raises
    :class:`SimulatedKill` - for tests of resume after a crash and of cleanup after an exception."""
    return _KillAtStep(step, None if checkpoint is None else str(checkpoint))


def assert_exact_resume_epochs(
    make_module: Callable[[], L.LightningModule],
    make_datamodule: Callable[[], L.LightningDataModule],
    make_callbacks: Callable[[], list[Callback]],
    tmp_path: str | Path,
    max_epochs: int = 2,
    limit_train_batches: int = 4,
    kill_step: int = 5,
    seed: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    make_plugins: Callable[[], Sequence[Any]] | None = None,
    compare_state: bool = True,
) -> dict[str, Any]:
    """A ``max_epochs``-bounded run, the way most users bound theirs: train ``max_epochs`` epochs straight; train
    again, checkpoint at the end of optimizer step ``kill_step`` (which should fall mid-epoch) and kill the run with an
    exception; resume from that checkpoint in fresh objects (``weights_only=True``) to the end. Asserts identical
    module weights and callback states, and returns the straight run's ``{"module", "callbacks", "trainer"}``."""
    tmp_path = Path(tmp_path)
    base: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
    )
    base.update(trainer_kwargs or {})
    base.update(max_epochs=max_epochs, limit_train_batches=limit_train_batches, max_steps=-1)

    def run(root: str, ckpt_path: str | None = None, kill: Callback | None = None) -> dict[str, Any]:
        L.seed_everything(seed, verbose=False)
        module, datamodule, callbacks = make_module(), make_datamodule(), make_callbacks()
        plugins = list(make_plugins()) if make_plugins is not None else []
        trainer = L.Trainer(default_root_dir=str(tmp_path / root), callbacks=callbacks + ([kill] if kill else []),
                            plugins=plugins or None, **base)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
        except SimulatedKill:
            pass
        return {"module": module, "callbacks": callbacks, "trainer": trainer}

    straight = run("straight")
    assert straight["trainer"].current_epoch == max_epochs, "the straight run did not finish its epochs"
    ckpt = tmp_path / "killed.ckpt"
    killed = run("killed", kill=kill_at_step(kill_step, ckpt))
    assert ckpt.exists(), f"no checkpoint was written at step {kill_step}"
    assert killed["trainer"].global_step == kill_step
    resumed = run("resumed", ckpt_path=str(ckpt))
    assert resumed["trainer"].current_epoch == max_epochs
    assert straight["trainer"].global_step == resumed["trainer"].global_step, (
        f"global_step: straight {straight['trainer'].global_step}, resumed {resumed['trainer'].global_step}"
    )
    assert_same(straight["module"].state_dict(), resumed["module"].state_dict(), "module")
    if compare_state:
        assert_same(_callback_states(straight["callbacks"]), _callback_states(resumed["callbacks"]), "callbacks")
    return straight
