"""Learning-rate schedules without touching the module: warmup + decay, one-cycle, warm restarts, ReduceLROnPlateau.

Functional core (plain Python/torch): :func:`lr_at` (the LR factor at an optimizer step, closed form),
:func:`schedule_total_steps` (the true number of optimizer steps under scheduled accumulation) and
:class:`AgreedReduceLROnPlateau` (torch's plateau scheduler that agrees on the metric across ranks).
Lightning adapters: :class:`LRSchedule` and :class:`ReduceLROnPlateau`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_techniques._internal import compat
from lightning_techniques._internal.conflicts import check_conflicts, takes_over
from lightning_techniques._internal.distributed import broadcast_object
from lightning_techniques._internal.lean_hooks import LeanHooks, needed_while
from lightning_techniques._internal.schedule import interpolate, progress
from lightning_techniques._internal.step_logging import resolve_log_flag, should_log_step
from lightning_techniques._internal.validation import (
    check_choice,
    check_non_negative,
    check_number,
    check_positive,
)
from lightning_techniques.optim._configure import log_learning_rates, register_scheduler_provider, unregister

ScheduleName = Literal["constant", "cosine", "linear", "polynomial", "step", "exponential", "one_cycle", "cosine_restarts"]
SCHEDULES = ("constant", "cosine", "linear", "polynomial", "step", "exponential", "one_cycle", "cosine_restarts")


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return interpolate(start, end, pct, "cosine")


def lr_at(
    step: int,
    total: int,
    schedule: ScheduleName = "cosine",
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
    power: float = 1.0,
    step_size: int | None = None,
    gamma: float = 0.1,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    cycle_steps: int | None = None,
    cycle_mult: int = 1,
) -> float:
    """The LR multiplier (of the optimizer's base LR) for the update after ``step`` optimizer steps (``step`` >= 0).

    Warm-up (every schedule but ``one_cycle``): ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``, a
    linear ramp that reaches 1 at ``step == warmup_steps``. Then, with ``t = step - warmup_steps``,
    ``T = total - warmup_steps`` and ``p = min(t / T, 1)``, ``m = min_ratio``:

    * ``constant``: 1
    * ``cosine``: ``m + (1 - m) * (1 + cos(pi p)) / 2`` (Loshchilov & Hutter, SGDR, 2017, one cycle)
    * ``linear``: ``m + (1 - m) * (1 - p)``;  ``polynomial``: ``m + (1 - m) * (1 - p) ** power``
    * ``step``: ``max(m, gamma ** (t // step_size))`` (torch ``StepLR`` when m = 0)
    * ``exponential``: ``max(m, gamma ** t)`` (torch ``ExponentialLR`` when m = 0)
    * ``cosine_restarts``: cosine from 1 to ``m`` over cycles of ``cycle_steps`` steps, each ``cycle_mult`` times
      longer than the last (torch ``CosineAnnealingWarmRestarts``; ``total`` is not used)
    * ``one_cycle``: Smith & Topin (2019) as torch ``OneCycleLR`` (cosine anneal, no momentum cycling): from
      ``1 / div_factor`` up to 1 over the first ``pct_start * total`` steps, then down to
      ``1 / (div_factor * final_div_factor)`` at ``step == total - 1`` (later steps stay there).
    """
    if total < 1:
        raise ValueError(f"total={total} must be at least 1 optimizer step.")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0.")
    if schedule == "one_cycle":
        step = min(step, total - 1)
        initial = 1.0 / div_factor
        final = initial / final_div_factor
        end_up = float(pct_start * total) - 1.0
        end_down = float(total - 1)
        if step <= end_up:
            return _cos_anneal(initial, 1.0, step / end_up if end_up > 0 else 1.0)
        span = end_down - end_up
        return _cos_anneal(1.0, final, (step - end_up) / span if span > 0 else 1.0)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = step - warmup_steps
    p = progress(t, max(1, total - warmup_steps))
    m = min_ratio
    if schedule in ("constant", "cosine", "linear", "polynomial"):
        return interpolate(1.0, m, p, schedule, power=power)
    if schedule == "step":
        if not step_size:
            raise ValueError("schedule='step' needs step_size.")
        return max(m, gamma ** (t // step_size))
    if schedule == "exponential":
        return max(m, gamma**t)
    if schedule == "cosine_restarts":
        if not cycle_steps:
            raise ValueError("schedule='cosine_restarts' needs cycle_steps.")
        if cycle_mult == 1:
            t_cur, t_i = t % cycle_steps, cycle_steps
        else:
            n = int(math.log(t / cycle_steps * (cycle_mult - 1) + 1, cycle_mult))
            t_cur = t - cycle_steps * (cycle_mult**n - 1) / (cycle_mult - 1)
            t_i = cycle_steps * cycle_mult**n
        return interpolate(1.0, m, t_cur / t_i, "cosine")
    raise ValueError(f"schedule={schedule!r} is not allowed; choose one of {list(SCHEDULES)}.")


def schedule_total_steps(
    batches_per_epoch: int,
    max_epochs: int,
    accumulation: Callable[[int], int] | int = 1,
    max_steps: int = -1,
) -> int:
    """Optimizer steps of a run: ``sum over epochs e of ceil(batches_per_epoch / accumulation(e))``, capped by
    ``max_steps`` (when > 0). Lightning steps at the end of an epoch even after a partial accumulation, hence ceil.
    ``accumulation`` is a number or a function of the epoch (e.g. a ``GradientAccumulationScheduler``'s
    ``get_accumulate_grad_batches``), which ``trainer.estimated_stepping_batches`` does not take into account."""
    if max_epochs < 0:
        if max_steps <= 0:
            raise ValueError("an endless run (max_epochs=-1, max_steps=-1) has no total number of steps.")
        return max_steps
    factor = accumulation if callable(accumulation) else (lambda _epoch: int(accumulation))
    total = sum(math.ceil(batches_per_epoch / factor(epoch)) for epoch in range(max(max_epochs, 1)))
    return min(total, max_steps) if max_steps > 0 else total


class AgreedReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` that first replaces the metric with an agreed value.

    ``agree(value) -> value`` (e.g. rank 0's value broadcast to every rank) runs in :meth:`step`, so every rank
    makes the same reduce/keep decision even when the metric was logged without ``sync_dist``. The rule itself is
    torch's (reduce by ``factor`` after ``patience`` checks without a ``threshold`` improvement, then ``cooldown``).

    Args:
        optimizer: the optimizer whose LRs are reduced.
        agree: ``value -> agreed value`` (default: none, plain torch behaviour).
        **kwargs: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` arguments (``mode``, ``factor``, ``patience`` ...).

    Example::

        sched = AgreedReduceLROnPlateau(opt, agree=lambda v: broadcast_object(strategy, v), patience=2)

    Limits: ``agree`` is a collective under DDP: every rank must call :meth:`step` the same number of times.
    """

    def __init__(self, optimizer: Optimizer, agree: Callable[[float], float] | None = None, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.agree = agree

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        value = float(metrics)
        if self.agree is not None:
            value = float(self.agree(value))
        super().step(value)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "agree"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        agree = self.agree
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "agree"})
        self.agree = agree


def _accumulation_callbacks(trainer: Any) -> tuple[list[GradientAccumulationScheduler], list[Callback]]:
    lightning = [cb for cb in trainer.callbacks if isinstance(cb, GradientAccumulationScheduler)]
    others = [cb for cb in trainer.callbacks
              if not isinstance(cb, GradientAccumulationScheduler)
              # declared (ours), or a third-party callback whose name says it changes the accumulation
              and ("accumulation" in takes_over(cb) or "accumulat" in type(cb).__name__.lower())]
    return lightning, others


class LRSchedule(LeanHooks, Callback):
    """Linear warm-up + cosine / linear / polynomial / step / exponential decay, one-cycle or cosine with warm
    restarts, for an unmodified LightningModule, stepped once per optimizer step.

    The schedule multiplies the LR(s) of whatever optimizers the run uses - the module's own ``configure_optimizers``
    or an :class:`~lightning_techniques.optim.optimizers.OptimizerCallback` (any order in ``callbacks``) - through a
    ``LambdaLR`` with ``interval="step"`` driven by :func:`lr_at`. Lightning steps it only on optimizer steps, so it
    is correct under gradient accumulation; its state is checkpointed by Lightning, so resume is exact. The LR of
    every parameter group is logged as ``lr-<group name>`` (e.g. ``lr-decay``, ``lr-pg0``) at the Trainer's
    ``log_every_n_steps`` cadence and on the run's last step.

    Sources: warm-up, Goyal et al. (2017); cosine annealing and warm restarts, Loshchilov & Hutter (SGDR, 2017);
    one-cycle, Smith & Topin (2019); step / exponential / polynomial decay are the classical schedules.

    Schedule length: ``total_steps`` when given; otherwise ``trainer.estimated_stepping_batches`` (``max_steps``
    and/or ``max_epochs`` x batches / ``accumulate_grad_batches``), except that with Lightning's epoch-based
    ``GradientAccumulationScheduler`` the length is summed epoch by epoch with each epoch's factor
    (:func:`schedule_total_steps`), which Lightning's estimate does not do; and an accumulation callback that
    offers ``total_optimizer_steps(trainer)`` (this package's ``AccumulationScheduler``, by step or by epoch) is
    asked for the exact count. Any other callback that changes ``trainer.accumulate_grad_batches`` cannot be
    predicted: pass the true number of optimizer steps as ``total_steps`` (a warning says so when such a callback
    is present and ``total_steps`` is missing).

    Args:
        schedule: one of ``constant, cosine, linear, polynomial, step, exponential, one_cycle, cosine_restarts``.
        warmup_steps: linear warm-up length in optimizer steps (not used by ``one_cycle``).
        warmup_fraction: warm-up as a fraction of the total (instead of ``warmup_steps``).
        total_steps: the true number of optimizer steps (default: derived from the Trainer, see above).
        min_lr_ratio: the LR floor as a fraction of the base LR (cosine/linear/polynomial end there).
        power: exponent of ``polynomial``.
        step_size, gamma: ``step`` multiplies by ``gamma`` every ``step_size`` steps; ``exponential`` by ``gamma``
            every step.
        pct_start, div_factor, final_div_factor: ``one_cycle`` as in ``torch.optim.lr_scheduler.OneCycleLR``
            (the optimizer's LR is the peak LR).
        cycle_steps, cycle_mult: ``cosine_restarts`` first cycle length and its growth factor (T_0, T_mult).
        log: log the LR of every parameter group (at ``log_every_n_steps``; not passed: ``True``; ``False``: log
            nothing).
        log_lr: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[OptimizerCallback("adamw", lr=3e-3),
                                                      LRSchedule("cosine", warmup_fraction=0.05)])

    Limits: automatic optimisation only (in manual optimisation call the scheduler yourself); one scheduler per
    optimizer (it refuses to stack on a scheduler the module already returns, or on :class:`ReduceLROnPlateau`);
    ``one_cycle`` does not cycle momentum.
    """

    takes_over: frozenset[str] = frozenset({"configure_optimizers", "lr"})
    conflicts_with: tuple[str, ...] = ("ReduceLROnPlateau", "StochasticWeightAveraging")

    def __init__(
        self,
        schedule: ScheduleName = "cosine",
        warmup_steps: int = 0,
        warmup_fraction: float = 0.0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        power: float = 1.0,
        step_size: int | None = None,
        gamma: float = 0.1,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        cycle_steps: int | None = None,
        cycle_mult: int = 1,
        log: bool | None = None,
        log_lr: bool | None = None,
    ) -> None:
        log_enabled = resolve_log_flag("LRSchedule", log, log_lr=log_lr)
        check_choice("schedule", schedule, SCHEDULES)
        check_non_negative("warmup_steps", warmup_steps, integer=True)
        check_number("warmup_fraction", warmup_fraction, low=0.0, high=1.0, high_inclusive=False)
        if warmup_steps and warmup_fraction:
            raise ValueError("give warmup_steps or warmup_fraction, not both.")
        if total_steps is not None:
            check_positive("total_steps", total_steps, integer=True)
            if warmup_steps >= total_steps and schedule != "cosine_restarts":
                raise ValueError(f"warmup_steps={warmup_steps} must be smaller than total_steps={total_steps}.")
        check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
        check_positive("power", power)
        if schedule == "step":
            if step_size is None:
                raise ValueError("schedule='step' needs step_size (optimizer steps between LR drops).")
        if step_size is not None:
            check_positive("step_size", step_size, integer=True)
        check_number("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
        check_number("pct_start", pct_start, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_number("div_factor", div_factor, low=1.0)
        check_number("final_div_factor", final_div_factor, low=1.0)
        if schedule == "cosine_restarts" and cycle_steps is None:
            raise ValueError("schedule='cosine_restarts' needs cycle_steps (length of the first cycle, T_0).")
        if cycle_steps is not None:
            check_positive("cycle_steps", cycle_steps, integer=True)
        check_positive("cycle_mult", cycle_mult, integer=True)
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.power = power
        self.step_size = step_size
        self.gamma = gamma
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.cycle_steps = cycle_steps
        self.cycle_mult = cycle_mult
        self._log_enabled = log_enabled  # not ``self.log``: Lightning assigns that before setup
        self.resolved_total_steps: int | None = None
        self.resolved_warmup_steps: int | None = None
        self.schedulers: list[LambdaLR] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        if not pl_module.automatic_optimization:
            raise ValueError("LRSchedule needs automatic optimisation (Lightning steps the scheduler); with manual "
                             "optimisation build a LambdaLR over lr_at(...) and step it yourself.")
        if compat.is_deepspeed(trainer.strategy):
            raise ValueError("LRSchedule does not support DeepSpeed (it configures its own schedulers).")
        if self.total_steps is None and trainer.max_steps == -1 and trainer.max_epochs == -1:
            raise ValueError("LRSchedule: the run is endless (max_steps=-1, max_epochs=-1); pass total_steps=.")
        _, others = _accumulation_callbacks(trainer)
        others = [cb for cb in others if not callable(getattr(cb, "total_optimizer_steps", None))]
        if others and self.total_steps is None:
            rank_zero_warn(
                f"LRSchedule: {[type(cb).__name__ for cb in others]} changes accumulate_grad_batches during the run; "
                "the schedule length estimated from the Trainer counts optimizer steps at the initial "
                "accumulation. Pass total_steps= (the true number of optimizer steps) for an exact schedule."
            )
        register_scheduler_provider(pl_module, self, self._provide)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            unregister(pl_module, self)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        unregister(pl_module, self)  # a failed fit must not leave the module patched

    def _resolve_total(self, trainer: Any) -> int:
        if self.total_steps is not None:
            return self.total_steps
        lightning, others = _accumulation_callbacks(trainer)
        estimate = trainer.estimated_stepping_batches  # also loads the train dataloader when needed
        for callback in others:  # e.g. AccumulationScheduler: it knows the exact optimizer steps of its plan
            exact = getattr(callback, "total_optimizer_steps", None)
            if callable(exact):
                return int(exact(trainer))
        if lightning and trainer.max_epochs != -1 and math.isfinite(trainer.num_training_batches):
            scheduler = lightning[0]
            return schedule_total_steps(int(trainer.num_training_batches), int(trainer.max_epochs),
                                        scheduler.get_accumulate_grad_batches, int(trainer.max_steps))
        if not math.isfinite(estimate):
            raise ValueError("LRSchedule: cannot derive the number of optimizer steps (endless or iterable "
                             "dataset); pass total_steps=.")
        return int(estimate)

    def factor(self, step: int) -> float:
        """The LR multiplier at optimizer step ``step`` of this run (after the total is resolved)."""
        assert self.resolved_total_steps is not None, "the schedule length is resolved when fit configures optimizers"
        return lr_at(
            step,
            self.resolved_total_steps,
            self.schedule,
            warmup_steps=self.resolved_warmup_steps or 0,
            min_ratio=self.min_lr_ratio,
            power=self.power,
            step_size=self.step_size,
            gamma=self.gamma,
            pct_start=self.pct_start,
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
            cycle_steps=self.cycle_steps,
            cycle_mult=self.cycle_mult,
        )

    def _provide(self, module: nn.Module, optimizers: list) -> list[dict[str, Any]]:
        trainer: Any = module.trainer  # a LightningModule's Trainer (nn.Module.__getattr__ is typed Tensor | Module)
        total = self._resolve_total(trainer)
        warmup = self.warmup_steps or int(round(self.warmup_fraction * total))
        if self.schedule not in ("one_cycle", "cosine_restarts") and warmup >= total:
            raise ValueError(f"LRSchedule: warm-up ({warmup} steps) is not shorter than the run ({total} optimizer "
                             "steps); lower warmup_steps/warmup_fraction or pass total_steps=.")
        self.resolved_total_steps, self.resolved_warmup_steps = total, warmup

        def factor(step: int) -> float:  # a plain function: LambdaLR then keeps none of it in its state dict
            return self.factor(step)

        self.schedulers = [LambdaLR(opt, factor) for opt in optimizers]
        return [{"scheduler": s, "interval": "step", "frequency": 1, "name": f"LRSchedule-{self.schedule}"}
                for s in self.schedulers]

    @needed_while(lambda self: self._log_enabled)
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._log_enabled and should_log_step(trainer):
            log_learning_rates(pl_module, trainer.optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {"resolved_total_steps": self.resolved_total_steps, "resolved_warmup_steps": self.resolved_warmup_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the length is derived again from the resumed Trainer (or total_steps); kept for inspection
        self.resolved_total_steps = state_dict.get("resolved_total_steps")
        self.resolved_warmup_steps = state_dict.get("resolved_warmup_steps")


class ReduceLROnPlateau(LeanHooks, Callback):
    """Reduce the LR by ``factor`` when a monitored metric stops improving for ``patience`` checks, with cooldown
    and a minimum LR, for an unmodified LightningModule; every DDP rank takes the same decision.

    It adds torch's ``ReduceLROnPlateau`` (the classic "reduce on plateau" rule of Keras / torch; see also Bengio,
    "Practical recommendations for gradient-based training", 2012) to whatever optimizers the run uses (the
    module's own or an :class:`~lightning_techniques.optim.optimizers.OptimizerCallback`'s), monitoring
    ``monitor`` from ``trainer.callback_metrics`` after every ``frequency`` epochs (or steps). Under DDP the metric
    is replaced by rank 0's value before the decision (:class:`AgreedReduceLROnPlateau`), so LR reductions agree
    even when the metric was logged without ``sync_dist`` (log it with ``sync_dist=True`` to decide on the mean
    over ranks). Its state (best, bad epochs, cooldown) is checkpointed by Lightning, so resume is exact. The LR of
    every parameter group is logged as ``lr-<group name>`` at the Trainer's ``log_every_n_steps`` cadence and on the
    run's last step.

    Args:
        monitor: the logged metric to watch (e.g. ``"val_loss"``).
        mode: ``"min"`` or ``"max"``.
        factor: multiply the LR by this on a plateau (0 < factor < 1).
        patience: checks without improvement before reducing.
        threshold, threshold_mode: what counts as an improvement (``"rel"`` or ``"abs"``), as in torch.
        cooldown: checks to wait after a reduction before counting again.
        min_lr: lower bound on the LR (all groups).
        eps: reductions smaller than this are skipped.
        interval: ``"epoch"`` (after validation) or ``"step"``.
        frequency: check every ``frequency`` intervals.
        strict: raise when ``monitor`` is missing (otherwise warn and skip).
        log: log the LR of every parameter group (at ``log_every_n_steps``; not passed: ``True``; ``False``: log
            nothing).
        log_lr: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(max_epochs=30, callbacks=[ReduceLROnPlateau("val_loss", patience=2, factor=0.5)])

    Limits: automatic optimisation only; refuses to stack on another scheduler of the same optimizer (e.g.
    :class:`LRSchedule`, whose LambdaLR would overwrite the reductions).
    """

    takes_over: frozenset[str] = frozenset({"configure_optimizers", "lr"})
    conflicts_with: tuple[str, ...] = ("LRSchedule", "StochasticWeightAveraging")

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
        interval: Literal["epoch", "step"] = "epoch",
        frequency: int = 1,
        strict: bool = True,
        log: bool | None = None,
        log_lr: bool | None = None,
    ) -> None:
        log_enabled = resolve_log_flag("ReduceLROnPlateau", log, log_lr=log_lr)
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be the name of a logged metric, got {monitor!r}.")
        check_choice("mode", mode, ["min", "max"])
        check_number("factor", factor, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_non_negative("patience", patience, integer=True)
        check_non_negative("threshold", threshold)
        check_choice("threshold_mode", threshold_mode, ["rel", "abs"])
        check_non_negative("cooldown", cooldown, integer=True)
        check_non_negative("min_lr", min_lr)
        check_non_negative("eps", eps)
        check_choice("interval", interval, ["epoch", "step"])
        check_positive("frequency", frequency, integer=True)
        self.monitor = monitor
        self.mode = mode
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.eps = eps
        self.interval = interval
        self.frequency = frequency
        self.strict = strict
        self._log_enabled = log_enabled  # not ``self.log``: Lightning assigns that before setup
        self.schedulers: list[AgreedReduceLROnPlateau] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        if not pl_module.automatic_optimization:
            raise ValueError("ReduceLROnPlateau needs automatic optimisation (Lightning steps the scheduler).")
        if compat.is_deepspeed(trainer.strategy):
            raise ValueError("ReduceLROnPlateau does not support DeepSpeed (it configures its own schedulers).")
        register_scheduler_provider(pl_module, self, self._provide)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            unregister(pl_module, self)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        unregister(pl_module, self)  # a failed fit must not leave the module patched

    def _provide(self, module: nn.Module, optimizers: list) -> list[dict[str, Any]]:
        trainer: Any = module.trainer  # a LightningModule's Trainer (nn.Module.__getattr__ is typed Tensor | Module)
        strategy = trainer.strategy

        def agree(value: float) -> float:
            return broadcast_object(strategy, value)

        self.schedulers = [
            AgreedReduceLROnPlateau(
                opt, agree=agree, mode=self.mode, factor=self.factor, patience=self.patience,
                threshold=self.threshold, threshold_mode=self.threshold_mode, cooldown=self.cooldown,
                min_lr=self.min_lr, eps=self.eps,
            )
            for opt in optimizers
        ]
        return [
            {"scheduler": s, "monitor": self.monitor, "interval": self.interval, "frequency": self.frequency,
             "strict": self.strict, "reduce_on_plateau": True, "name": "ReduceLROnPlateau"}
            for s in self.schedulers
        ]

    @needed_while(lambda self: self._log_enabled)
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._log_enabled and should_log_step(trainer):
            log_learning_rates(pl_module, trainer.optimizers)

    def state_dict(self) -> dict[str, Any]:
        # the scheduler's own state (best, num_bad_epochs, cooldown_counter) is in the checkpoint's lr_schedulers
        return {"monitor": self.monitor}
