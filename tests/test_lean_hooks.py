"""``LeanHooks`` (lightning_techniques/_internal/lean_hooks.py): the per-batch hooks a technique does not implement
are skipped by Lightning's dispatcher - and are Lightning's ordinary no-op for everybody else."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden

import lightning_techniques as lt
from lightning_techniques._internal import compat, lean_hooks
from lightning_techniques._internal.lean_hooks import PER_BATCH_HOOKS, LeanHooks, skipped_hooks
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.registry import REGISTRY

CALLBACK_ENTRIES = [e for e in REGISTRY if isinstance(e.cls, type) and issubclass(e.cls, Callback)]


def _implemented(cls: type, hook: str) -> bool:
    owner = next(k for k in cls.__mro__ if hook in vars(k))
    return owner is not Callback and not isinstance(vars(owner)[hook], lean_hooks._UnimplementedHook)


@pytest.mark.parametrize("entry", CALLBACK_ENTRIES, ids=[e.name for e in CALLBACK_ENTRIES])
def test_every_technique_skips_the_per_batch_hooks_it_does_not_implement(entry: Any) -> None:
    """The mixin comes before ``Callback`` in every technique's MRO: no per-batch hook resolves to Callback's no-op."""
    cls = entry.cls
    assert issubclass(cls, LeanHooks), f"{cls.__name__}: declare it as class {cls.__name__}(LeanHooks, ...Callback)"
    for hook in PER_BATCH_HOOKS:
        static = inspect.getattr_static(cls, hook)
        assert static is not getattr(Callback, hook), f"{cls.__name__}.{hook} resolves to Callback's no-op"
        assert _implemented(cls, hook) != isinstance(static, lean_hooks._UnimplementedHook)


def test_dispatcher_recognised_on_this_lightning() -> None:
    assert compat.CALLBACK_DISPATCH_CODE is not None  # lightning 2.5/2.6: ``if callable(fn)`` in the dispatcher


class _Counting(lt.NonFiniteGuard):
    """A user's subclass that adds a hook and calls ``super()`` (Callback's no-op through the mixin)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.starts += 1


def _fit(callbacks: list[Callback], steps: int = 3) -> SimpleProfiler:
    profiler = SimpleProfiler()
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=2, callbacks=callbacks,
                        profiler=profiler, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16))
    return profiler


def _dispatched(profiler: SimpleProfiler, name: str) -> set[str]:
    prefix = f"[Callback]{name}."
    return {action[len(prefix):] for action in profiler.recorded_durations if action.startswith(prefix)}


def test_lightning_calls_only_the_implemented_per_batch_hooks() -> None:
    guard, user = lt.NonFiniteGuard(), _Counting()
    profiler = _fit([guard, user])
    guard_hooks = _dispatched(profiler, "NonFiniteGuard")
    assert "on_before_optimizer_step" in guard_hooks or "on_after_backward" in guard_hooks
    implemented = {h for h in PER_BATCH_HOOKS if _implemented(lt.NonFiniteGuard, h)}
    assert guard_hooks & set(PER_BATCH_HOOKS) == implemented
    assert set(skipped_hooks(guard)) == set(PER_BATCH_HOOKS) - implemented
    # the user's subclass: its own hook dispatched (and its super() call worked), the rest as for the parent
    assert user.starts == 3
    assert "on_train_batch_start" in _dispatched(profiler, "_Counting")
    assert "on_train_batch_start" not in skipped_hooks(user)
    # per-epoch hooks are not touched: still dispatched as before
    assert "on_train_epoch_start" in guard_hooks
    # a plain Callback (no mixin) keeps every hook
    assert set(PER_BATCH_HOOKS) - {"on_predict_batch_start", "on_predict_batch_end", "on_test_batch_start",
                                   "on_test_batch_end"} <= _dispatched(_fit([Callback()], 2), "Callback")


def test_everybody_but_the_dispatcher_sees_the_ordinary_no_op() -> None:
    guard = lt.NonFiniteGuard()
    hook = "on_train_batch_start"
    assert hook in skipped_hooks(guard)
    assert callable(getattr(guard, hook))
    assert getattr(guard, hook)(None, None, None, 0) is None  # a wrapper forwarding every hook still works
    assert type(guard).on_train_batch_start is Callback.on_train_batch_start  # the class: nothing overridden
    assert not is_overridden(hook, guard, Callback)
    assert is_overridden(next(h for h in PER_BATCH_HOOKS if _implemented(type(guard), h)), guard, Callback)
    guard.on_train_batch_start = lambda *a: None  # an instance attribute comes first (e.g. a profiler's wrapper)
    assert hook not in skipped_hooks(guard)
    assert "skipped by Lightning's dispatcher" in repr(inspect.getattr_static(type(guard), hook))


def test_a_lightning_that_cannot_skip_gets_the_ordinary_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the dispatcher is not recognised (renamed, or without the ``callable`` check) nothing is hidden."""
    from lightning.pytorch.trainer import call

    def dispatcher_without_check(trainer: Any, hook_name: str, *args: Any, **kwargs: Any) -> None:
        for callback in trainer.callbacks:
            getattr(callback, hook_name)(trainer, trainer.lightning_module, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(call, "_call_callback_hooks", dispatcher_without_check)
        assert compat._callback_dispatch_code() is None
        patch.delattr(call, "_call_callback_hooks")
        assert compat._callback_dispatch_code() is None
    assert compat._callback_dispatch_code() is compat.CALLBACK_DISPATCH_CODE
    monkeypatch.setattr(compat, "CALLBACK_DISPATCH_CODE", None)
    guard = lt.NonFiniteGuard()
    assert skipped_hooks(guard) == []
    profiler = _fit([guard], 2)
    assert "on_train_batch_start" in _dispatched(profiler, "NonFiniteGuard")


def test_a_hook_needed_only_while_a_condition_holds_is_dispatched_only_then() -> None:
    """``needed_while``: LSUV's batch hook runs for the first batch only; OptimizerCallback's only for L-BFGS; the
    guard's loss hook only with ``check_loss``; a direct call still runs the method."""
    lsuv = lt.LSUVInit()
    assert "on_train_batch_start" not in skipped_hooks(lsuv)
    guard = lt.NonFiniteGuard(check_loss=False)
    optim = lt.OptimizerCallback("adam", lr=1e-3)
    profiler = _fit([lsuv, guard, optim], steps=4)
    assert lsuv.done
    assert len(profiler.recorded_durations["[Callback]LSUVInit.on_train_batch_start"]) == 1  # the first batch
    assert "on_train_batch_start" in skipped_hooks(lsuv)
    assert "on_before_backward" not in _dispatched(profiler, "NonFiniteGuard")
    assert "on_before_backward" in skipped_hooks(guard)
    assert "on_train_batch_start" not in _dispatched(profiler, optim.state_key)
    # everybody else still gets the method: a direct call runs it (the guard then keeps the loss)
    assert is_overridden("on_before_backward", guard, Callback)
    guard.check_loss = True
    assert "on_before_backward" not in skipped_hooks(guard)
    guard._losses = []
    loss = torch.tensor(1.0)
    guard.on_before_backward(None, None, loss)
    assert len(guard._losses) == 1
    assert type(guard).on_before_backward.__name__ == "on_before_backward"


def test_the_issue_14_stack_makes_six_hook_calls_per_step() -> None:
    """The 11 per-step techniques of ``benchmarks/overhead.py`` stacked: Lightning dispatches 6 hook calls to them per
    training step (66 without LeanHooks / needed_while: 11 callbacks x 6 per-batch training hooks), counted by the
    Trainer's profiler, deterministic."""
    from benchmarks.overhead import STACKED, TECHNIQUES, NoOpCallback, count_work

    model = lambda: DigitsCNN(channels=4)  # noqa: E731
    assert count_work(model, [NoOpCallback] * 11)[2] == 66
    assert count_work(model, [TECHNIQUES[name] for name in STACKED])[2] == 6


def test_the_mechanism_bases_and_the_run_clean_up_skip_unimplemented_hooks_too() -> None:
    """Not registry entries, so checked here: the bases the techniques build on, and ``MechanismCleanup`` - which the
    mechanisms append to every run's callbacks - have the mixin; the clean-up is dispatched no per-batch hook and still
    undoes the run's batch transform at teardown."""
    from lightning_techniques._internal.batch_transforms import BatchTransformCallback
    from lightning_techniques._internal.eval_stages import EvaluationCallback
    from lightning_techniques._internal.patching import MechanismCleanup, patch_layers
    from lightning_techniques._internal.sampling import SteeringCallback

    for base in (MechanismCleanup, SteeringCallback, BatchTransformCallback, EvaluationCallback):
        assert issubclass(base, LeanHooks) and base.__mro__.index(LeanHooks) < base.__mro__.index(Callback)
    assert set(skipped_hooks(MechanismCleanup())) == set(PER_BATCH_HOOKS)
    datamodule = DigitsDataModule(batch_size=16)
    layers_during_fit: list[int] = []

    class Probe(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            layers_during_fit.append(patch_layers(datamodule, "on_after_batch_transfer"))

    profiler = SimpleProfiler()
    trainer = L.Trainer(max_steps=3, limit_val_batches=0,
                        callbacks=[lt.ZScoreNormalization(), lt.Oversampling(), Probe()],
                        profiler=profiler, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(DigitsCNN(channels=4), datamodule=datamodule)
    cleanup_hooks = _dispatched(profiler, "MechanismCleanup")
    assert "teardown" in cleanup_hooks and not cleanup_hooks & set(PER_BATCH_HOOKS)
    assert layers_during_fit == [1, 1, 1]  # the Z-score transform was installed for the run ...
    assert patch_layers(datamodule, "on_after_batch_transfer") == 0  # ... and undone at its end
    assert not _dispatched(profiler, "Oversampling") & set(PER_BATCH_HOOKS) - {
        h for h in PER_BATCH_HOOKS if _implemented(lt.Oversampling, h)}
