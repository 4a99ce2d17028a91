"""Every use of Lightning's private API, in one place (checked on lightning 2.5 - 2.6; ``pyproject.toml`` pins
``lightning<2.7``).

The techniques need a few things Lightning does not expose publicly: the fit loop's train-dataloader source (to
steer the sampler), the number of training batches *before* the fit loop sets its loader up, Lightning's own way of
rebuilding a DataLoader with another sampler, the parser of ``configure_optimizers`` return values, and the loop
limits that ``trainer.estimated_stepping_batches`` reads. Each is one function here, tested in
``tests/test_seams.py``, so that a Lightning upgrade breaks in one file with a clear error instead of silently in
many. Strategy checks use ``isinstance`` against Lightning's strategy classes (a user's subclass of
``DDPStrategy`` is a DDP strategy; a class merely *named* like one is not).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import CombinedLoader

if TYPE_CHECKING:  # (patching's MechanismCleanup imports lean_hooks, which imports this module)
    from lightning_techniques._internal.patching import MethodPatch

#: The Lightning versions this module was checked against (also the dependency range in ``pyproject.toml``).
LIGHTNING_SUPPORTED = ">=2.5,<2.7"


# ------------------------------------------------------------------------------------------- callback dispatch
def _callback_dispatch_code() -> Any:
    """The code object of Lightning's callback-hook dispatcher (``trainer.call._call_callback_hooks``) when it skips a
    hook attribute that is not callable (``if callable(fn)``), else None (then no hook is ever hidden: see
    ``lean_hooks.py``)."""
    from lightning.pytorch.trainer import call

    code = getattr(getattr(call, "_call_callback_hooks", None), "__code__", None)
    return code if code is not None and "callable" in code.co_names else None


#: Lightning's callback dispatcher, recognised by ``lean_hooks`` (None: it cannot skip a hook).
CALLBACK_DISPATCH_CODE = _callback_dispatch_code()


# ------------------------------------------------------------------------------------------------ step metrics
def step_metric_stores(trainer: Any) -> tuple[dict, dict, int] | None:
    """``(callback metrics, logged metrics, step)`` of ``trainer``'s logger connector: the dictionaries behind
    ``trainer.callback_metrics`` / ``trainer.logged_metrics`` (the properties merge the result collection into them
    and return them; ``reset_metrics`` replaces them at the start of a run) and the step Lightning logs the current
    training batch's step metrics at (``_batches_that_stepped``, which the fit loop increments only after it wrote
    them). None when this Lightning keeps them elsewhere (then the caller falls back to ``LightningModule.log``)."""
    connector = getattr(trainer, "_logger_connector", None)
    callback = getattr(connector, "_callback_metrics", None)
    logged = getattr(connector, "_logged_metrics", None)
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    if not isinstance(callback, dict) or not isinstance(logged, dict) or not isinstance(step, int):
        return None
    return callback, logged, step


# --------------------------------------------------------------------------------------------------- strategies
def is_deepspeed(strategy: Strategy | Any) -> bool:
    """True for Lightning's ``DeepSpeedStrategy`` (and subclasses)."""
    return isinstance(strategy, DeepSpeedStrategy)


def is_fsdp(strategy: Strategy | Any) -> bool:
    """True for Lightning's ``FSDPStrategy`` (and subclasses)."""
    return isinstance(strategy, FSDPStrategy)


def shards_parameters(strategy: Strategy | Any) -> bool:
    """True when the strategy shards parameters/gradients/optimizer state across ranks (FSDP, DeepSpeed,
    ModelParallel): per-rank gradients and weights are then not the whole model's."""
    return isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))


def strategy_owns_accumulation(strategy: Strategy | Any) -> bool:
    """True when the strategy accumulates gradients itself (DeepSpeed fixes the factor when its engine starts)."""
    return is_deepspeed(strategy) or bool(getattr(strategy, "handles_gradient_accumulation", False))


def layer_sync_enabled(trainer: Any) -> bool:
    """Whether ``Trainer(sync_batchnorm=True)`` (or a ``LayerSync`` plugin) is on: the strategy's private
    ``_layer_sync`` (set by the accelerator connector on strategies that support it)."""
    return getattr(trainer.strategy, "_layer_sync", None) is not None


def is_combined_loader(obj: Any) -> bool:
    """True for Lightning's ``CombinedLoader``."""
    return isinstance(obj, CombinedLoader)


# --------------------------------------------------------------------------------------------------- train data
def train_data_source(trainer: Any) -> Any:
    """The fit loop's train-dataloader source (``fit_loop._data_source``): its ``dataloader()`` calls the module's,
    the datamodule's or the loader given to ``fit``. None before ``fit`` attached one."""
    return getattr(getattr(trainer, "fit_loop", None), "_data_source", None)


def request_train_dataloader(trainer: Any) -> Any:
    """Ask the run's train-dataloader source for its loader, as Lightning does (arguments captured so that
    :func:`update_dataloader` can rebuild it). Does not touch the fit loop's state."""
    from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader

    source = train_data_source(trainer)
    if source is None:
        raise RuntimeError("The Trainer has no train dataloader source; this is only available during fit.")
    return _request_dataloader(source)


def fit_loader_is_set_up(trainer: Any) -> bool:
    """Whether the fit loop has already set up (and will reuse) its train loader."""
    return getattr(trainer.fit_loop, "_combined_loader", None) is not None


def count_train_batches(trainer: Any) -> int | float:
    """The number of training batches per epoch (per rank), as ``trainer.num_training_batches`` will be, without
    setting up the fit loop's loader.

    ``trainer.estimated_stepping_batches`` calls ``fit_loop.setup_data()`` when the loader is not set up yet; when
    that happens before the checkpoint's loop state is restored (e.g. from ``configure_optimizers``), the loader it
    builds misses the restored state. This builds a throw-away loader instead (the source's ``dataloader()`` is
    called once more, as Lightning's estimate does) and never iterates it. ``inf`` for an unsized loader.
    """
    from lightning.fabric.utilities.data import sized_len
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches, _resolve_overfit_batches
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if fit_loader_is_set_up(trainer):
        return trainer.num_training_batches
    module = trainer.lightning_module
    if trainer.limit_train_batches == 0 or module is None or not is_overridden("training_step", module):
        return 0
    loader = request_train_dataloader(trainer)
    combined = loader if isinstance(loader, CombinedLoader) else CombinedLoader(loader, "max_size_cycle")
    if trainer.overfit_batches > 0:
        _resolve_overfit_batches(combined, mode=RunningStage.TRAINING)
    limits: list[int | float] = []
    for dl in combined.flattened:
        dl = trainer._data_connector._prepare_dataloader(dl, shuffle=True, mode=RunningStage.TRAINING)
        length = sized_len(dl)
        limits.append(_parse_num_batches(RunningStage.TRAINING, float("inf") if length is None else length,
                                         trainer.limit_train_batches))
    if not limits:
        return 0
    # the combined length as CombinedLoader computes it per mode, without iterating it (iterating a multi-worker
    # loader would start its sampler)
    reducers: dict[str, Callable[[list[int | float]], int | float]] = {
        "min_size": min, "max_size_cycle": max, "max_size": max, "sequential": sum}
    reduce = reducers[combined._mode]
    return reduce(limits)


def update_dataloader(loader: Any, sampler: Any) -> Any:
    """A copy of the DataLoader ``loader`` with ``sampler`` (Lightning's own ``_update_dataloader``: it re-creates a
    user's DataLoader subclass from its captured arguments)."""
    from lightning.pytorch.utilities.data import _update_dataloader

    return _update_dataloader(loader, sampler)


def fit_progress(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches of it fetched)`` from the fit loop's progress counters (prefetching does not skew it)."""
    loop = trainer.fit_loop
    return int(loop.epoch_progress.current.processed), int(loop.epoch_loop.batch_progress.current.ready)


@contextmanager
def stepping_batches_as(trainer: Any, total: int) -> Iterator[None]:
    """Inside the block ``trainer.estimated_stepping_batches`` returns ``total`` (for a run bound by ``max_epochs``).

    Lightning computes ``min(ceil(batches / k) * epochs, max_steps)``; with ``k = 1`` and ``max_steps = total`` that
    is ``total`` (``total`` never exceeds the batches of the run). The loop limit and the factor are put back after.
    """
    loop = trainer.fit_loop.epoch_loop
    saved = (loop.max_steps, trainer.accumulate_grad_batches)
    loop.max_steps, trainer.accumulate_grad_batches = int(total), 1
    try:
        yield
    finally:
        loop.max_steps, trainer.accumulate_grad_batches = saved


# --------------------------------------------------------------------------------------------------- optimizers
def parse_optimizer_config(conf: Any) -> tuple[list, list, str | None]:
    """``(optimizers, schedulers, monitor)`` from anything ``configure_optimizers`` may return, parsed by Lightning's
    own parser; ``None`` (no optimizer) gives Lightning's placeholder optimizer."""
    from lightning.pytorch.core.optimizer import _configure_optimizers, _MockOptimizer

    if conf is None:
        return [_MockOptimizer()], [], None
    optimizers, schedulers, monitor = _configure_optimizers(conf)
    return list(optimizers), list(schedulers), monitor


# --------------------------------------------------------------------------------------------------- warnings
#: Lightning's warning for a mid-epoch resume with a loader that has no ``state_dict`` (training_epoch_loop.py).
MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def quiet_mid_epoch_resume_warning(trainer: Any, is_exact: Callable[[], bool]) -> MethodPatch:
    """Silence Lightning's "not resumable" mid-epoch warning - only inside the epoch loop's ``reset`` and only while
    ``is_exact()`` says the run's train order is resumed exactly (a steered sampler keeps its own position).

    The filter is local (``warnings.catch_warnings``): nothing else in the process is silenced. Returns the patch;
    ``restore()`` it when the run ends.
    """
    def make_wrapper(call_next: Callable[..., Any]) -> Callable[..., Any]:
        def reset(*args: Any, **kwargs: Any) -> Any:
            if not is_exact():
                return call_next(*args, **kwargs)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=MID_EPOCH_RESUME_WARNING)
                return call_next(*args, **kwargs)

        return reset

    from lightning_techniques._internal.patching import MethodPatch

    return MethodPatch(trainer.fit_loop.epoch_loop, "reset", make_wrapper)


def discard_train_loader(trainer: Any) -> None:
    """Drop a train loader the fit loop set up early (``estimated_stepping_batches`` read before the checkpoint's loop
    state was restored), so that the loop sets it up again after the restore - only then does Lightning load a
    resumable loader's state (an early ``setup_data()`` skips that load)."""
    loop = trainer.fit_loop
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is not None:
        fetcher.teardown()
        loop._data_fetcher = None
    loop._combined_loader = None


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def train_data_fetcher(trainer: Any) -> Any:
    """The fit loop's train data fetcher (``fit_loop._data_fetcher``), or None before the loop set it up."""
    return getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)
