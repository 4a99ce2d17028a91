"""Early stopping that restores the best weights (Keras' ``restore_best_weights``, refused upstream in #1415)."""

from __future__ import annotations

import copy
import math
import numbers
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import EarlyStopping as _LightningEarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_techniques._internal import compat
from lightning_techniques._internal.artifacts import atomic_torch_save
from lightning_techniques._internal.distributed import broadcast_object
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.validation import check_choice


class InvalidArgumentError(MisconfigurationException, ValueError):
    """A bad argument value: a ``ValueError`` that ``except MisconfigurationException`` (what Lightning's own
    ``EarlyStopping`` raises) still catches."""


class InvalidArgumentTypeError(MisconfigurationException, TypeError):
    """A bad argument type: a ``TypeError`` that ``except MisconfigurationException`` still catches."""


def snapshot_state(module: nn.Module) -> dict[str, Any]:
    """A detached CPU copy of ``module.state_dict()`` (the functional core of best-weight keeping)."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in module.state_dict().items()}


def _buffers_fit(buffers: dict[str, Any] | None, state: dict[str, Any], device: torch.device | None) -> bool:
    if buffers is None or buffers.keys() != state.keys():
        return False
    for key, value in state.items():
        held = buffers[key]
        if isinstance(value, Tensor):
            target = value.device if device is None else device
            if not (isinstance(held, Tensor) and held.shape == value.shape and held.dtype == value.dtype
                    and held.device == target):
                return False
    return True


def copy_state_into(
    module: nn.Module, buffers: dict[str, Any] | None = None, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Copy ``module.state_dict()`` into ``buffers`` with ``Tensor.copy_`` and return them.

    The buffers are allocated once (on ``device``, default: where each tensor lives) and reused by every later call
    as long as keys, shapes, dtypes and devices still match, so keeping the best weights costs one device-to-device
    copy per improvement and no allocation. Non-tensor entries (``get_extra_state``) are deep-copied.
    """
    device = torch.device(device) if device is not None else None
    state = module.state_dict()
    if not _buffers_fit(buffers, state, device):
        pin = device is not None and device.type == "cpu" and torch.cuda.is_available()
        buffers = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                target = value.device if device is None else device
                buffers[key] = torch.empty(value.shape, dtype=value.dtype, device=target,
                                           pin_memory=pin and value.is_cuda)
    assert buffers is not None
    with torch.no_grad():
        for key, value in state.items():
            if isinstance(value, Tensor):
                buffers[key].copy_(value.detach())
            else:
                buffers[key] = copy.deepcopy(value)
    return buffers


def restore_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into ``module`` in place (parameters keep their identity, so optimizers stay valid)."""
    module.load_state_dict(state, strict=True)


def _check_real(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a real number or None" if optional else "a real number"
        raise InvalidArgumentTypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(float(value)):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}.")


class EarlyStopping(LeanHooks, _LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` (same arguments, same state key) that also restores the best weights.

    When training ends - because this callback stopped it, or ``max_epochs``/``max_steps`` was reached - the module's
    weights are set back to those of the best monitored score, as Keras' ``restore_best_weights`` does (Prechelt,
    "Early Stopping - But When?", 1998, recommends exactly this: keep the model of the lowest validation error).

    A drop-in for :class:`lightning.pytorch.callbacks.EarlyStopping`: it accepts what Lightning accepts (numpy
    integers and floats included), bad arguments raise an error that is both a ``ValueError``/``TypeError`` and a
    ``MisconfigurationException``, the metric is compared at its own precision (a float64 metric stays float64), and a
    checkpoint written by Lightning's own ``EarlyStopping`` resumes (its best score, wait count and stop reason load;
    it holds no weights, which is reported at the end if no better score followed).

    Under DDP all ranks evaluate rank 0's value of the monitored metric, so best score, patience counter, stop
    decision and restored weights agree on every rank (log the metric with ``sync_dist=True`` for the mean over
    ranks). The best weights survive checkpoint/resume: with ``best_weights_storage="device"`` or ``"cpu"`` they are
    part of this callback's checkpoint state; with ``"disk"`` each rank keeps them in ``best_weights_dir`` (default:
    ``<default_root_dir>/early_stopping``) and the checkpoint stores the path.

    Args:
        restore_best_weights: restore the best weights at the end of training (default True).
        best_weights_storage: where the best copy lives. ``"device"`` (default): next to the model, in buffers
            allocated once and overwritten with ``copy_`` on each improvement (cheapest; on a GPU it costs one more
            copy of the weights in GPU memory). ``"cpu"``: in host memory (pinned when CUDA is available), also
            allocated once. ``"disk"``: a file per rank, written on each improvement (least memory).
        best_weights_dir: directory for ``"disk"`` storage.
        **kwargs: every argument of :class:`lightning.pytorch.callbacks.EarlyStopping` (``monitor``, ``mode``,
            ``patience``, ``min_delta``, ``check_finite``, ``stopping_threshold`` ...).

    Example::

        model = DigitsCNN()
        trainer = L.Trainer(max_epochs=30, callbacks=[EarlyStopping(monitor="val_loss", patience=3)])
        trainer.fit(model, datamodule=DigitsDataModule())   # model now holds the best-val_loss weights

    Limits: only model weights are restored (not optimizer state); FSDP/DeepSpeed sharded weights are refused.
    """

    takes_over: frozenset[str] = frozenset({"stopping"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: Literal["min", "max"] = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = True,
        best_weights_storage: Literal["device", "cpu", "disk"] = "device",
        best_weights_dir: str | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise InvalidArgumentTypeError(f"monitor must be a non-empty metric name (str), got {monitor!r}.")
        # Lightning itself only checks `mode`; numpy integers/floats are accepted like Python ones
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise InvalidArgumentError(
                f"patience must be a non-negative integer, got {patience!r} ({type(patience).__name__})."
            )
        _check_real("min_delta", min_delta)
        _check_real("stopping_threshold", stopping_threshold, optional=True)
        _check_real("divergence_threshold", divergence_threshold, optional=True)
        try:
            check_choice("mode", mode, ["min", "max"])
            check_choice("best_weights_storage", best_weights_storage, ["device", "cpu", "disk"])
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from None
        if best_weights_dir is not None and best_weights_storage != "disk":
            raise InvalidArgumentError("best_weights_dir is only used with best_weights_storage='disk'.")
        super().__init__(
            monitor=monitor,
            min_delta=float(min_delta),
            patience=int(patience),
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=None if stopping_threshold is None else float(stopping_threshold),
            divergence_threshold=None if divergence_threshold is None else float(divergence_threshold),
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.restore_best_weights: bool = restore_best_weights
        self.best_weights_storage: Literal["device", "cpu", "disk"] = best_weights_storage
        self.best_weights_dir: str | None = best_weights_dir
        self.best_weights: dict[str, Any] | None = None  # device / cpu storage: buffers reused across improvements
        self.best_weights_path: str | None = None  # disk storage
        self.best_epoch: int = -1
        self.best_step: int = -1
        self.restored: bool = False
        self._rank: int = 0

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.restore_best_weights and compat.shards_parameters(trainer.strategy):
            raise InvalidArgumentError(
                f"EarlyStopping(restore_best_weights=True) does not support {type(trainer.strategy).__name__}: "
                "sharded weights cannot be snapshotted per rank. Use restore_best_weights=False with ModelCheckpoint."
            )
        self._rank = trainer.global_rank
        if self.best_weights_storage == "disk" and self.best_weights_dir is None:
            self.best_weights_dir = str(Path(trainer.default_root_dir) / "early_stopping")

    @property
    def state_key(self) -> str:
        """Lightning's key (``EarlyStopping{'monitor': ..., 'mode': ...}``), formatted once per ``(monitor, mode)``:
        Lightning reads it for every hook of every step (``_call_callback_hooks``), and formatting it each time costs
        ~0.5 us per read."""
        ident = (self.monitor, self.mode)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != ident:
            cached = self.__dict__["_state_key_cache"] = (ident, super().state_key)
        return cached[1]

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # best weights loaded from a checkpoint arrive on the CPU; "device" storage keeps them next to the model, in
        # the buffers every later improvement is copied into
        if self.best_weights_storage == "device" and self.best_weights is not None:
            held = self.best_weights
            buffers = {k: torch.empty_like(v, device=pl_module.device) if isinstance(v, Tensor) else v
                       for k, v in held.items()}
            for key, value in held.items():
                if isinstance(value, Tensor):
                    buffers[key].copy_(value)
            self.best_weights = buffers

    def _run_early_stopping_check(self, trainer: Any) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        # every rank decides on rank 0's value (at the metric's own precision: a float64 metric stays float64), so
        # the state below is identical on all ranks
        current = logs[self.monitor].squeeze().detach().to("cpu", copy=True)
        current = broadcast_object(trainer.strategy, current)
        previous_best = self.best_score
        should_stop, reason = self._evaluate_stopping_criteria(current)
        improved = self.best_score is current and self.best_score is not previous_best
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)
        if improved and self.restore_best_weights:
            self._save_best(trainer)

    def _save_best(self, trainer: Any) -> None:
        module = trainer.lightning_module
        self.best_epoch = int(trainer.current_epoch)
        self.best_step = int(trainer.global_step)
        if self.best_weights_storage == "device":
            self.best_weights = copy_state_into(module, self.best_weights)
            return
        if self.best_weights_storage == "cpu":
            self.best_weights = copy_state_into(module, self.best_weights, device="cpu")
            return
        assert self.best_weights_dir is not None
        path = Path(self.best_weights_dir) / f"best_weights_rank{trainer.global_rank}.pt"
        atomic_torch_save(snapshot_state(module), path)
        self.best_weights_path = str(path)

    def _load_best(self) -> dict[str, Any] | None:
        if self.best_weights_storage != "disk":
            return self.best_weights
        if self.best_weights_path is None:
            return None
        return torch.load(self.best_weights_path, map_location="cpu", weights_only=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.restore_best_weights:
            return
        state = self._load_best()
        if state is None:
            if torch.isfinite(torch.as_tensor(self.best_score)).item():
                rank_zero_warn(
                    f"EarlyStopping: the best {self.monitor}={float(self.best_score):.6g} was reached before this run "
                    "resumed, from a checkpoint that holds no best weights (written by Lightning's own EarlyStopping "
                    "or with restore_best_weights=False), and no better value followed; the model keeps its final "
                    "weights."
                )
            else:
                rank_zero_warn(
                    f"EarlyStopping: no value of {self.monitor!r} was ever recorded, so there are no best weights to "
                    "restore; the model keeps its final weights."
                )
            return
        restore_state(pl_module, state)
        self.restored = True
        rank_zero_info(
            f"EarlyStopping: restored the weights of epoch {self.best_epoch} (step {self.best_step}) with "
            f"{self.monitor}={float(self.best_score):.6g}."
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        weights = None
        if self.best_weights_storage != "disk" and self.best_weights is not None:
            # a CPU copy: the checkpoint loads on any device, and a later improvement cannot alter what was saved
            weights = {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v)
                       for k, v in self.best_weights.items()}
        state.update(
            best_epoch=self.best_epoch,
            best_step=self.best_step,
            best_weights_storage=self.best_weights_storage,
            best_weights=weights,
            best_weights_path=self.best_weights_path,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a checkpoint of Lightning's own EarlyStopping has only its keys: best score, wait count, stop reason load
        # here, and there are no best weights (on_train_end says so if no better score follows)
        super().load_state_dict(state_dict)
        self.best_epoch = int(state_dict.get("best_epoch", -1))
        self.best_step = int(state_dict.get("best_step", -1))
        stored = state_dict.get("best_weights_storage", self.best_weights_storage)
        weights = state_dict.get("best_weights")
        path = state_dict.get("best_weights_path")
        if path is not None and self._rank != 0:
            # the checkpoint holds rank 0's path; this rank kept its own file beside it
            path = str(Path(path).with_name(f"best_weights_rank{self._rank}.pt"))
        if stored == "disk" and path is not None and self.restore_best_weights and not os.path.exists(path):
            raise FileNotFoundError(
                f"EarlyStopping: the checkpoint's best weights file {path} is missing. Restore it, or resume with "
                "restore_best_weights=False."
            )
        if self.best_weights_storage != "disk":
            self.best_weights = weights if weights is not None else (
                torch.load(path, map_location="cpu", weights_only=True) if path else None
            )
        else:
            self.best_weights_path = path
            if weights is not None and self.best_weights_dir is not None:
                # a checkpoint written with in-memory storage, resumed with disk storage: move the weights to disk
                target = Path(self.best_weights_dir) / f"best_weights_rank{self._rank}.pt"
                self.best_weights_path = str(atomic_torch_save(weights, target))
