"""Gradient-accumulation scheduling by optimizer step or by epoch, with exactly aligned accumulation boundaries.

Lightning's own ``GradientAccumulationScheduler`` switches only at epoch starts and ``estimated_stepping_batches``
ignores it (upstream request #21534 asks for step-based schedules). This module schedules by step or epoch, grows
accumulation for a batch-size warm-up, and tells LR schedules the true number of optimizer steps.

How Lightning accumulates (``loops/training_epoch_loop.py``, ``loops/optimization/automatic.py``, lightning 2.6):
with ``k = trainer.accumulate_grad_batches`` and epoch-local counters, the gradients are zeroed before the
micro-batch with ``batch_idx % k == 0``, the optimizer steps after the micro-batch with ``(batch_idx + 1) % k == 0``
or the epoch's last batch, the loss is divided by ``k``, and under DDP gradient synchronisation is blocked
(``no_sync``) on every micro-batch that does not step. All of this reads ``k`` afresh on every batch. Changing ``k``
at an arbitrary point would zero (or not zero) the gradients in the middle of a group and step on a group of the
wrong size. Here ``k`` is changed only at the start of a group (a step boundary) whose epoch-local position is a
multiple of the new ``k`` - always true at the start of an epoch - so every group is ``k`` consecutive micro-batches
with the same ``k``. A switch that is due at a non-aligned boundary waits for the next aligned one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_techniques._internal import compat
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.patching import MethodPatch, undo_at_run_end
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics
from lightning_techniques._internal.validation import check_choice, check_number, check_positive


# ---------------------------------------------------------------------------------------------- functional core
@dataclass(frozen=True)
class PlannedStep:
    """One optimizer step of an accumulation plan: its index, epoch, first epoch-local batch, the number of
    micro-batches it accumulates, and the factor ``k`` in force (``micro_batches < k`` only for an epoch's last)."""

    step: int
    epoch: int
    first_batch: int
    micro_batches: int
    factor: int


def factor_at(scheduling: Mapping[int, int], t: int) -> int:
    """The factor of the largest key ``<= t`` in ``scheduling`` (1 when every key is larger)."""
    keys = [key for key in scheduling if key <= t]
    return int(scheduling[max(keys)]) if keys else 1


def aligned_factor(current: int, target: int, position: int) -> int:
    """The factor to use for the group starting at epoch-local batch ``position``: ``target`` when the position is a
    multiple of it (the group boundaries stay aligned), else the ``current`` factor."""
    return target if position % target == 0 else current


def batch_size_warmup(
    final_factor: int, warmup_steps: int, start_factor: int = 1, growth: Literal["double", "linear"] = "double"
) -> dict[int, int]:
    """A step schedule that grows accumulation from ``start_factor`` to ``final_factor`` over ``warmup_steps``
    optimizer steps (batch-size warm-up, as the effective batch size ``k * B`` rises; cf. Goyal et al. 2017's warm-up
    and Smith et al., "Don't Decay the Learning Rate, Increase the Batch Size", 2018).

    ``growth="double"`` doubles the factor at evenly spaced steps (1, 2, 4, ... capped at ``final_factor``), which
    rarely has to wait for an aligned boundary; ``"linear"`` adds 1 at each stage.
    """
    check_positive("start_factor", start_factor, integer=True)
    check_positive("final_factor", final_factor, integer=True)
    check_number("warmup_steps", warmup_steps, low=0, integer=True)
    check_choice("growth", growth, ["double", "linear"])
    if final_factor < start_factor:
        raise ValueError(f"final_factor={final_factor} must be >= start_factor={start_factor}.")
    factors = [start_factor]
    while factors[-1] < final_factor:
        nxt = factors[-1] * 2 if growth == "double" else factors[-1] + 1
        factors.append(min(nxt, final_factor))
    if len(factors) == 1:
        return {0: start_factor}
    stages = len(factors) - 1
    return {round(i * warmup_steps / stages): f for i, f in enumerate(factors)}


def plan_accumulation(
    scheduling: Mapping[int, int],
    unit: Literal["step", "epoch"],
    batches_per_epoch: int,
    max_epochs: int | None = None,
    max_steps: int | None = None,
) -> list[PlannedStep]:
    """Every optimizer step the schedule produces on Lightning's loop (the exact rule the callback applies).

    Args:
        scheduling: ``{start: factor}``; ``start`` is an optimizer step (``unit="step"``) or an epoch.
        batches_per_epoch: training batches per epoch (``trainer.num_training_batches``; per rank under DDP).
        max_epochs, max_steps: the Trainer's limits (at least one must be given; ``-1`` or ``None``: no limit).
    """
    check_choice("unit", unit, ["step", "epoch"])
    check_positive("batches_per_epoch", batches_per_epoch, integer=True)
    epochs = None if max_epochs in (None, -1) else int(max_epochs)
    steps = None if max_steps in (None, -1) else int(max_steps)
    if epochs is None and steps is None:
        raise ValueError("plan_accumulation needs max_epochs or max_steps (the run would never end).")
    plan: list[PlannedStep] = []
    factor = factor_at(scheduling, 0)
    epoch = 0
    while epochs is None or epoch < epochs:
        position = 0
        while position < batches_per_epoch:
            if steps is not None and len(plan) >= steps:
                return plan
            t = len(plan) if unit == "step" else epoch
            factor = aligned_factor(factor, factor_at(scheduling, t), position)
            size = min(factor, batches_per_epoch - position)
            plan.append(PlannedStep(len(plan), epoch, position, size, factor))
            position += size
        epoch += 1
    return plan


def _check_scheduling(scheduling: Mapping[int, int]) -> dict[int, int]:
    if not isinstance(scheduling, Mapping) or not scheduling:
        raise TypeError(f"scheduling must be a non-empty mapping {{start: factor}}, got {scheduling!r}.")
    out = {}
    for key, value in scheduling.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key  # YAML/JSON keys may arrive as strings
        check_number(f"scheduling key {key!r}", key, low=0, integer=True)
        check_positive(f"scheduling[{key}]", value, integer=True)
        out[key] = value
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------- Lightning adapter
class AccumulationScheduler(LeanHooks, Callback):
    """Gradient accumulation scheduled by optimizer step or by epoch, with aligned boundaries and exact step counts.

    Sets ``trainer.accumulate_grad_batches`` at group boundaries, so Lightning's own machinery does the rest: zeroing
    before a group, loss divided by ``k``, stepping after ``k`` micro-batches (or on the epoch's last batch), and
    under DDP gradient synchronisation only on the stepping micro-batch (``no_sync`` on the others, Lightning's
    ``_block_parallel_sync_behavior``). A new factor takes effect at the first step boundary at or after its start
    whose epoch-local position is a multiple of the new factor (always the case at an epoch start), so no group is ever
    split. :meth:`plan` / :meth:`total_optimizer_steps` give the exact optimizer steps of the run, and
    ``trainer.estimated_stepping_batches`` read inside ``configure_optimizers`` returns that true total (the hook is
    wrapped for the duration of the call; Lightning's own estimate ignores any schedule), so
    ``OneCycleLR(total_steps=self.trainer.estimated_stepping_batches)`` ends exactly on the last step. A step-interval
    scheduler whose ``total_steps`` still disagrees gets a warning at fit start.

    Batch-size warm-up (Goyal et al., "Accurate, Large Minibatch SGD", 2017; Smith, Kindermans, Ying & Le, "Don't
    Decay the Learning Rate, Increase the Batch Size", ICLR 2018): ``warmup_to=8, warmup_steps=300`` grows the factor
    1 -> 2 -> 4 -> 8 over the first 300 optimizer steps, so the effective batch size rises.

    Args:
        scheduling: ``{start: factor}``; e.g. ``{0: 1, 100: 2, 400: 4}`` (steps) or ``{0: 1, 3: 4}`` (epochs).
        unit: ``"step"`` (start = optimizer step, ``trainer.global_step``) or ``"epoch"``.
        warmup_to: instead of ``scheduling``: the final factor of a batch-size warm-up (``unit="step"``).
        warmup_steps: length of the warm-up in optimizer steps.
        warmup_growth: ``"double"`` or ``"linear"`` (see :func:`batch_size_warmup`).
        log: log the factor as ``accumulation/factor`` at the Trainer's ``log_every_n_steps`` cadence (and on the
            run's last step); ``False``: log nothing.

    Example::

        acc = AccumulationScheduler({0: 1, 50: 2, 150: 4}, unit="step")
        trainer = L.Trainer(max_epochs=10, callbacks=[acc])
        # configure_optimizers: total_steps=self.trainer.estimated_stepping_batches is now the true total
        # (equal to acc.total_optimizer_steps(trainer))

    Limits: automatic optimization only; ``estimated_stepping_batches`` is corrected only inside
    ``configure_optimizers`` (elsewhere use :meth:`total_optimizer_steps`); refuses DeepSpeed (the engine owns accumulation, set once at start) and a
    Trainer that also sets ``accumulate_grad_batches``; the last group of an epoch is shorter when the epoch does not
    divide (Lightning always steps on the epoch's last batch); a mid-epoch resume is exact only with a resumable
    (stateful) dataloader, as for any Lightning run, or with a technique that steers the train sampler
    (``Oversampling``, ``CurriculumLearning``); refuses Lightning's ``GradientAccumulationScheduler`` and
    ``OptimizerCallback("lbfgs")`` (checked in ``setup``).
    """

    takes_over: frozenset[str] = frozenset({"accumulation", "configure_optimizers"})
    conflicts_with: tuple[str, ...] = ("GradientAccumulationScheduler",)

    def __init__(
        self,
        scheduling: dict[int, int] | None = None,
        unit: Literal["step", "epoch"] = "step",
        warmup_to: int | None = None,
        warmup_steps: int | None = None,
        warmup_growth: Literal["double", "linear"] = "double",
        log: bool = True,
    ) -> None:
        check_choice("unit", unit, ["step", "epoch"])
        check_choice("warmup_growth", warmup_growth, ["double", "linear"])
        if (scheduling is None) == (warmup_to is None):
            raise ValueError("Pass exactly one of scheduling={start: factor} or warmup_to=<final factor>.")
        if warmup_to is not None:
            if warmup_steps is None:
                raise ValueError("warmup_to needs warmup_steps (the warm-up length in optimizer steps).")
            if unit != "step":
                raise ValueError("warmup_to schedules by optimizer step: use unit='step'.")
            schedule = batch_size_warmup(warmup_to, warmup_steps, growth=warmup_growth)
        else:
            schedule = _check_scheduling(scheduling)  # type: ignore[arg-type]
        self.scheduling = scheduling
        self.unit = unit
        self.warmup_to = warmup_to
        self.warmup_steps = warmup_steps
        self.warmup_growth = warmup_growth
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self.schedule: dict[int, int] = schedule
        self.factor = factor_at(schedule, 0)
        self.switches: list[dict[str, int]] = []  # {"step", "epoch", "batch", "factor"} of every change
        self._trainer: Any = None
        self._patch: MethodPatch | None = None
        self._trainer_factor: int | None = None  # the Trainer's own accumulate_grad_batches, put back after fit

    # ------------------------------------------------------------------ plan
    def plan(self, trainer: Any) -> list[PlannedStep]:
        """The exact optimizer steps of ``trainer``'s run (loads the train dataloader if needed, as
        ``estimated_stepping_batches`` does)."""
        # counted on a throw-away loader: a restored sampler / loader position is never used up by the count
        batches = compat.count_train_batches(trainer)
        if batches == float("inf"):
            raise ValueError("AccumulationScheduler.plan needs a sized train dataloader (an iterable one has no epochs).")
        return plan_accumulation(self.schedule, self.unit, int(batches), trainer.max_epochs, trainer.max_steps)

    def total_optimizer_steps(self, trainer: Any) -> int:
        """The true number of optimizer steps of the run (what ``total_steps=`` of an LR schedule needs)."""
        if trainer.max_epochs in (None, -1):
            if trainer.max_steps in (None, -1):
                raise ValueError("total_optimizer_steps: the run has neither max_epochs nor max_steps.")
            return int(trainer.max_steps)
        return len(self.plan(trainer))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        strategy = trainer.strategy
        if compat.strategy_owns_accumulation(strategy):
            raise ValueError(
                f"AccumulationScheduler cannot schedule accumulation under {type(strategy).__name__}: the strategy "
                "owns gradient accumulation (DeepSpeed fixes it at start). Use a constant accumulate_grad_batches."
            )
        if not pl_module.automatic_optimization:
            raise ValueError("AccumulationScheduler needs automatic optimization (manual optimization accumulates "
                             "in the user's training_step).")
        self._trainer = trainer
        self._trainer_factor = trainer.accumulate_grad_batches
        trainer.accumulate_grad_batches = self.factor
        if self._patch is None or not self._patch.active:
            self._patch = MethodPatch(pl_module, "configure_optimizers", self._true_estimate_during)
            undo_at_run_end(trainer, self._patch.restore)

    def _true_estimate_during(self, original: Any) -> Any:
        """Wrap ``configure_optimizers`` so that ``trainer.estimated_stepping_batches`` read inside it is the true
        number of optimizer steps of the schedule (Lightning computes ``min(ceil(batches / k) * epochs, max_steps)``:
        with ``k = 1`` and ``max_steps`` = the true total, that is the true total). Restored right after the call."""

        def configure_optimizers(*args: Any, **kwargs: Any) -> Any:
            trainer = self._trainer
            if trainer is None or trainer.max_epochs in (None, -1):
                return original(*args, **kwargs)
            had_loader = compat.fit_loader_is_set_up(trainer)
            try:
                try:
                    total = self.total_optimizer_steps(trainer)
                except ValueError:  # an iterable (unsized) train loader: nothing to correct
                    return original(*args, **kwargs)
                with compat.stepping_batches_as(trainer, total):
                    return original(*args, **kwargs)
            finally:
                if not had_loader and compat.fit_loader_is_set_up(trainer):
                    # configure_optimizers read estimated_stepping_batches, which set the train data up before the
                    # checkpoint's loop state is restored: hand the set-up back to the fit loop
                    compat.discard_train_loader(trainer)

        return configure_optimizers

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        trainer.accumulate_grad_batches = self.factor
        if trainer.max_epochs in (None, -1):
            return
        total: int | None = None
        for config in getattr(trainer, "lr_scheduler_configs", []):
            declared = getattr(config.scheduler, "total_steps", None)
            if config.interval != "step" or not isinstance(declared, int):
                continue
            total = self.total_optimizer_steps(trainer) if total is None else total
            if declared != total:
                rank_zero_warn(
                    f"AccumulationScheduler: {type(config.scheduler).__name__}(total_steps={declared}) but the "
                    f"accumulation schedule makes {total} optimizer steps (trainer.estimated_stepping_batches does not "
                    "know the schedule). Use total_steps=<AccumulationScheduler>.total_optimizer_steps(self.trainer)."
                )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.factor != 0:
            trainer.accumulate_grad_batches = self.factor
            return  # inside a group: never change k here
        t = trainer.global_step if self.unit == "step" else trainer.current_epoch
        new = aligned_factor(self.factor, factor_at(self.schedule, t), batch_idx)
        if new != self.factor:
            self.switches.append(
                {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch), "batch": int(batch_idx),
                 "factor": int(new)}
            )
            self.factor = new
        trainer.accumulate_grad_batches = self.factor
        if self._log_enabled:
            log_step_metrics(pl_module, {"accumulation/factor": float(self.factor)})

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        if stage == "fit":
            if self._trainer_factor is not None:
                trainer.accumulate_grad_batches = self._trainer_factor  # the Trainer as the user built it
                self._trainer_factor = None
            self._trainer = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # a failed fit leaves neither the module nor the Trainer changed

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "switches": [dict(s) for s in self.switches]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = int(state_dict.get("factor", self.factor))
        self.switches = [dict(s) for s in state_dict.get("switches", [])]
        if self._trainer is not None:
            # the epoch loop reads k when it restores its counters, before any batch hook runs
            self._trainer.accumulate_grad_batches = self.factor
