"""Transforming the batch on the device before ``*_step`` (train, and eval/predict where a technique needs it).

Lightning passes every batch, after moving it to the device, through ``on_after_batch_transfer`` of *either* the
LightningModule *or* the LightningDataModule (``_DataHookSelector.get_instance`` picks the datamodule when it
overrides the hook, or when neither does and a datamodule is attached) and uses the returned batch. This mechanism
wraps that hook on the chosen instance: the user's own hook runs first, then every registered transform in
registration order. A transform may return a batch of another structure (MixUp turns integer targets into soft
ones), which an in-place change in ``on_train_batch_start`` could not.

Stages are ``"train"``, ``"validate"`` (also the sanity check), ``"test"`` and ``"predict"``.

Every transform is also removed by the run's ``MechanismCleanup`` when the run ends or fails (a technique needs no
``on_exception``); ``handle.active`` tells a technique whether to register again in a later run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.patching import MethodPatch, undo_at_run_end

#: ``fn(batch, stage) -> batch``
BatchTransformFn = Callable[[Any, str], Any]

STAGES = ("train", "validate", "test", "predict")
_STAGE_OF = {
    RunningStage.TRAINING: "train",
    RunningStage.SANITY_CHECKING: "validate",
    RunningStage.VALIDATING: "validate",
    RunningStage.TESTING: "test",
    RunningStage.PREDICTING: "predict",
}
_ATTR = "_lt_batch_transforms"
_HOOK = "on_after_batch_transfer"


@dataclass
class _Transform:
    name: str
    fn: BatchTransformFn
    stages: frozenset[str]


def current_stage(trainer: Any) -> str | None:
    """The mechanism's stage name for the trainer's current running stage (None outside a loop)."""
    stage = getattr(trainer.state, "stage", None)
    return None if stage is None else _STAGE_OF.get(stage)


class BatchTransformHandle:
    """Returned by :func:`add_batch_transform`; :meth:`remove` unregisters (and unwraps the hook when last)."""

    def __init__(self, registry: _Registry, name: str) -> None:
        self._registry = registry
        self.name = name

    @property
    def active(self) -> bool:
        """False once removed (by the technique, or by the mechanism's clean-up after a failed run)."""
        return self.name in self._registry.transforms and self._registry.patch.active

    def remove(self) -> None:
        self._registry.remove(self.name)


class _Registry:
    def __init__(self, owner: Any, trainer: Any) -> None:
        self.owner = owner
        self.trainer = trainer
        self.transforms: dict[str, _Transform] = {}
        self.patch = MethodPatch(owner, _HOOK, self._make_wrapper)

    def _make_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def on_after_batch_transfer(batch: Any, dataloader_idx: int) -> Any:
            batch = original(batch, dataloader_idx)
            stage = current_stage(self.trainer)
            for transform in list(self.transforms.values()):
                if stage in transform.stages:
                    batch = transform.fn(batch, stage)
            return batch

        return on_after_batch_transfer

    def add(self, name: str, fn: BatchTransformFn, stages: frozenset[str]) -> BatchTransformHandle:
        if name in self.transforms:
            raise ValueError(f"A batch transform named {name!r} is already registered.")
        self.transforms[name] = _Transform(name, fn, stages)
        return BatchTransformHandle(self, name)

    def remove(self, name: str) -> None:
        self.transforms.pop(name, None)
        if not self.transforms:
            self.patch.restore()
            self.owner.__dict__.pop(_ATTR, None)


def hook_owner(trainer: Any, module: Any) -> Any:
    """The object whose ``on_after_batch_transfer`` Lightning will call for this run (module or datamodule)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return module
    if is_overridden(_HOOK, datamodule) or not is_overridden(_HOOK, module):
        return datamodule
    return module


def add_batch_transform(
    trainer: Any, module: Any, name: str, fn: BatchTransformFn, stages: Iterable[str] = ("train",)
) -> BatchTransformHandle:
    """Apply ``fn(batch, stage)`` to every on-device batch of the given ``stages``; call from ``setup``."""
    stage_set = frozenset(stages)
    bad = sorted(stage_set - set(STAGES))
    if bad or not stage_set:
        raise ValueError(f"stages={sorted(stage_set)} is invalid; choose a non-empty subset of {list(STAGES)}.")
    owner = hook_owner(trainer, module)
    registry = owner.__dict__.get(_ATTR)
    if registry is None or not registry.patch.active:
        registry = _Registry(owner, trainer)
        owner.__dict__[_ATTR] = registry
    handle = registry.add(name, fn, stage_set)
    undo_at_run_end(trainer, handle.remove)  # also undone when the run fails (no teardown then)
    return handle


class BatchTransformCallback(LeanHooks, Callback):
    """Base of techniques that transform the on-device batch (normalisation, noise, augmentation, MixUp/CutMix): it
    owns the transform's install and removal, so a technique states only *what* it does (``_transform``).

    ``install_transform`` in ``setup`` registers ``self._transform(batch, stage)`` for ``stages`` (again after a failed
    run, whose clean-up removed it); ``teardown`` removes it. Subclasses that extend ``teardown`` call ``super()``.
    """

    _transform_handle: BatchTransformHandle | None = None

    def _transform(self, batch: Any, stage: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def install_transform(self, trainer: Any, pl_module: Any, stages: Iterable[str] = ("train",)) -> None:
        handle = self._transform_handle
        if handle is None or not handle.active:  # (removed by the clean-up after a failed run)
            self._transform_handle = add_batch_transform(trainer, pl_module, type(self).__name__, self._transform,
                                                         stages=stages)

    def remove_transform(self) -> None:
        if self._transform_handle is not None:
            self._transform_handle.remove()
            self._transform_handle = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.remove_transform()
