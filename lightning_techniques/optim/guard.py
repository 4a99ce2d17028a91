"""Non-finite guard: skip an optimizer step whose gradients (or loss) are NaN/Inf, in any precision.

Lightning declined this in upstream issue #4956; under ``16-mixed`` the GradScaler does it silently, in ``32`` and
``bf16-mixed`` nothing does, and one NaN batch destroys the weights and the optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_techniques._internal import compat, grad_norms
from lightning_techniques._internal.distributed import agree_any
from lightning_techniques._internal.grad_norms import combined_norm, host_norms
from lightning_techniques._internal.lean_hooks import LeanHooks, needed_while
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics
from lightning_techniques._internal.validation import check_choice, check_positive

MAX_RECORDED_STEPS = 1000
"""How many skipped global steps :class:`NonFiniteGuard` and ``SmartMixedPrecision`` keep (the most recent ones);
their totals are counted separately, so the checkpointed state stays bounded however long the run."""


class NonFiniteTrainingError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` after too many consecutive skipped steps."""


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every param group of ``optimizer``, in order (``torch.optim`` refuses a parameter in two
    groups, so there are no duplicates)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def nonfinite_gradients(parameters: Iterable[Tensor]) -> int:
    """Number of parameters whose ``.grad`` holds at least one NaN or Inf (parameters without a grad are ignored)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0
    return int((~gradient_finite_flags(grads)).sum())


def gradient_finite_flags(grads: Sequence[Tensor]) -> Tensor:
    """One bool per gradient tensor: True when it holds no NaN/Inf. Computed with one fused
    ``torch._foreach_norm(grads, inf)`` (max-abs, which NaN and Inf propagate through and which cannot overflow,
    unlike a sum of squares) and no host sync."""
    device = grads[0].device
    norms = torch._foreach_norm(list(grads), math.inf)
    return torch.isfinite(torch.stack([n.to(device) for n in norms]))


def step_check(grads: Sequence[Tensor], losses: Sequence[Tensor] = ()) -> tuple[float, bool]:
    """``(total L2 norm of grads, all losses finite)`` with one host sync: the float32 L2 norm of every gradient and
    of every loss in one fused ``torch._foreach_norm`` read on the host
    (:func:`~lightning_techniques._internal.grad_norms.host_norms`), the total combined from them in double
    precision. The total is NaN/Inf when a gradient holds a NaN/Inf, or is so large that its own float32 norm
    overflows (in practice a diverged step); a loss counts as non-finite the same way."""
    norms = host_norms([*grads, *losses])
    n = len(grads)
    return combined_norm(norms[:n]), all(math.isfinite(v) for v in norms[n:])


def drop_gradients_(parameters: Iterable[Tensor]) -> None:
    """Set every ``.grad`` to ``None``: ``torch.optim`` optimizers then skip those parameters entirely in
    ``step()`` (no update, no weight decay, no change of their state such as Adam's moments or step count)."""
    for p in parameters:
        p.grad = None


class NonFiniteGuard(LeanHooks, Callback):
    """Skip the optimizer step when a gradient (or the loss) is NaN/Inf, count it, and stop after too many in a row.

    Runs in ``on_before_optimizer_step``, the first hook where the gradients are complete (every accumulated
    micro-batch), unscaled (under ``16-mixed`` Lightning unscales before it) and, under DDP, already all-reduced. A
    bad step is detected when any gradient holds a NaN/Inf or (``check_loss``) any micro-batch's loss was non-finite.
    The decision is agreed across DDP ranks (one rank's NaN skips the step on all of them). A skipped step sets every
    ``.grad`` of the optimizer's parameters to ``None``, so ``torch.optim`` optimizers leave those weights *and*
    their state (moments, step counters, momentum buffers, weight decay) untouched. Lightning still counts the step
    in ``global_step`` and steps per-step LR schedulers, as it does for a step the GradScaler skips.

    Idea: the "skip bad updates" practice of large-model training (e.g. Chowdhery et al., "PaLM", 2022, which
    skips batches around loss spikes; the GradScaler's skip-on-overflow, Micikevicius et al., "Mixed Precision
    Training", 2018) applied in any precision; Lightning declined it upstream (#4956).

    The check is the total L2 norm of the gradients (float32, one fused ``torch._foreach_norm`` that also takes the
    losses) and one host sync, as ``torch.nn.utils.clip_grad_norm_(..., error_if_nonfinite=True)`` does: a step is
    skipped when a gradient holds a NaN/Inf or is so large that its norm overflows float32 - the same test
    :class:`AutoClip` and :class:`AdaptiveGradientClipping` apply, so a step they cannot clip is always skipped. The
    norm of a kept step is handed on to an :class:`AutoClip` after it, which then does not read the gradients for it
    again (see ``lightning_techniques/_internal/grad_norms.py``).

    Logged (``pl_module.log``, at the Trainer's ``log_every_n_steps`` cadence and on the run's last step):
    ``nonfinite_guard/skipped`` (1 on a skipped step) and ``nonfinite_guard/skipped_total``. State kept in
    checkpoints: total and consecutive skips and the global steps of the last ``MAX_RECORDED_STEPS`` (1000) skips
    (bounded, however many steps are skipped over a run).

    Args:
        max_consecutive_skips: after this many skipped steps in a row the run stops (``None``: never).
        check_loss: also skip when a micro-batch's loss was non-finite (seen in ``on_before_backward``).
        on_limit: ``"raise"`` a :class:`NonFiniteTrainingError` (default) or ``"stop"`` the run gracefully
            (``trainer.should_stop``) with a warning.
        log: log the counters with ``pl_module.log`` (``False``: log nothing).

    Example::

        trainer = L.Trainer(callbacks=[NonFiniteGuard(max_consecutive_skips=5)], precision="bf16-mixed")

    Limits: refuses DeepSpeed (its engine owns the step). Under ``16-mixed`` the scaler's own overflow skips while it
    calibrates its scale are also counted (they are non-finite steps): keep ``max_consecutive_skips`` above the
    handful the scaler needs. Put it before clipping callbacks in ``callbacks`` so they never see a skipped step
    (and :class:`AutoClip` after it reuses its norm).
    Optimizers that step parameters without a gradient (rare custom ones) are not protected.
    """

    takes_over: frozenset[str] = frozenset({"optimizer_step", "gradients"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()
    remembers_grad_norm = True  # the step's total gradient norm: lightning_techniques/_internal/grad_norms.py

    def __init__(
        self,
        max_consecutive_skips: int | None = 10,
        check_loss: bool = True,
        on_limit: Literal["raise", "stop"] = "raise",
        log: bool = True,
    ) -> None:
        if max_consecutive_skips is not None:
            check_positive("max_consecutive_skips", max_consecutive_skips, integer=True)
        check_choice("on_limit", on_limit, ["raise", "stop"])
        self.max_consecutive_skips = max_consecutive_skips
        self.check_loss = bool(check_loss)
        self.on_limit = on_limit
        # never ``self.log``: Lightning overwrites that attribute with the module's ``log`` before setup
        self._log_enabled = check_log_flag("log", log)
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []  # global steps of the last MAX_RECORDED_STEPS skips
        self._losses: list[Tensor] = []  # the micro-batch losses since the last step, checked with the gradients
        self._remember_norm = False  # an AutoClip after it reuses the step's norm (set in setup)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remember_norm = grad_norms.peers(trainer, self)[1]
        if compat.is_deepspeed(trainer.strategy):
            raise ValueError(
                f"NonFiniteGuard does not support {type(trainer.strategy).__name__}: the DeepSpeed engine owns the "
                "optimizer step (use DeepSpeed's own overflow handling)."
            )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._losses = []

    @needed_while(lambda self: self.check_loss)
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self.check_loss:  # kept on the device and checked together with the gradients: one sync per step
            self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        params = optimizer_parameters(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        total, loss_finite = step_check(grads, self._losses)  # the step's one host sync
        self._losses = []
        bad = agree_any(trainer.strategy, not (math.isfinite(total) and loss_finite))
        if not bad and grads and self._remember_norm:
            grad_norms.remember(trainer, grads, total)  # AutoClip / AGC later in this step reuse it
        if bad:
            drop_gradients_(params)
            self.skipped_total += 1
            self.consecutive_skips += 1
            self.skipped_steps.append(int(trainer.global_step))
            if len(self.skipped_steps) > MAX_RECORDED_STEPS:
                del self.skipped_steps[0]
        else:
            self.consecutive_skips = 0
        if self._log_enabled:
            log_step_metrics(pl_module, {"nonfinite_guard/skipped": float(bad),
                                         "nonfinite_guard/skipped_total": float(self.skipped_total)})
        if bad:
            self._check_limit(trainer)

    def _check_limit(self, trainer: Any) -> None:
        limit = self.max_consecutive_skips
        if limit is None or self.consecutive_skips < limit:
            return
        message = (
            f"NonFiniteGuard: {self.consecutive_skips} consecutive optimizer steps had non-finite gradients or loss "
            f"(global steps {self.skipped_steps[-self.consecutive_skips:]}); the weights were left untouched. "
            "Lower the learning rate, check the data for NaN/Inf, or use bf16/fp32 instead of fp16."
        )
        if self.on_limit == "raise":
            raise NonFiniteTrainingError(message)
        rank_zero_warn(message + " Stopping the run.")
        trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "skipped_steps": list(self.skipped_steps),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.skipped_steps = [int(s) for s in state_dict.get("skipped_steps", [])][-MAX_RECORDED_STEPS:]
