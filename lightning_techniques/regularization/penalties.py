"""L1 / L2 weight penalties added to the training loss (through the shared loss-term mechanism).

Functional core: :func:`penalty_parameters` (which parameters: weights by default, not biases or normalisation
parameters), :func:`weight_penalty` (``sum |w|`` or ``sum w^2``) and :func:`warmup_coefficient`; adapters
:class:`L1Penalty` and :class:`L2Penalty`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.loss_terms import LossTermHandle, add_loss_term
from lightning_techniques._internal.schedule import interpolate, progress
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics, resolve_log_flag
from lightning_techniques._internal.validation import check_non_negative, check_number, resolve_layer_type
from lightning_techniques.finetune._peft import current_parameter_name

PenaltyKind = Literal["l1", "l2"]

#: Normalisation layers whose affine parameters are never penalised by default.
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (getattr(nn.modules.batchnorm, "_NormBase", None), nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                getattr(nn, "RMSNorm", None)) if t is not None
)


def _compile(argument: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"{argument} must be a regular expression string, got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{argument}={pattern!r} is not a valid regular expression ({err}).") from None


def _resolve_types(layer_types: Sequence[str | type[nn.Module]] | None) -> tuple[type[nn.Module], ...] | None:
    if layer_types is None:
        return None
    resolved = [resolve_layer_type(spec, "layer_types") for spec in layer_types]
    if not resolved:
        raise ValueError("layer_types must name at least one layer type (or be None for every layer).")
    return tuple(resolved)


def penalty_parameters(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
    layer_types: Sequence[str | type[nn.Module]] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs a weight penalty applies to.

    Default: every trainable parameter named ``weight`` of a layer that is not a normalisation layer (so biases,
    BatchNorm/LayerNorm/GroupNorm scales are left out, as is customary). ``include``: a regular expression
    (``re.search`` on the qualified parameter name) that replaces the default name rule (e.g. ``"weight|bias"``);
    ``exclude``: a regular expression of names to leave out; ``layer_types``: only parameters of these layer types.
    Raises ``ValueError`` naming the parameters that exist when nothing is selected.
    """
    inc, exc = _compile("include", include), _compile("exclude", exclude)
    types = _resolve_types(layer_types)
    chosen: list[tuple[str, nn.Parameter]] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if not param.requires_grad:
                continue
            if types is not None and not isinstance(module, types):
                continue
            if inc is not None:
                if not inc.search(name):
                    continue
            elif param_name != "weight" or isinstance(module, NORM_TYPES):
                continue
            if exc is not None and exc.search(name):
                continue
            chosen.append((name, param))
    if not chosen:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        raise ValueError(f"no parameter selected by include={include!r}, exclude={exclude!r}, "
                         f"layer_types={layer_types!r}. Trainable parameters of the model: {names}")
    return chosen


def weight_penalty(params: Sequence[torch.Tensor], kind: PenaltyKind) -> torch.Tensor:
    """``sum_i |w_i|`` (``"l1"``, gradient ``sign(w)``) or ``sum_i w_i^2`` (``"l2"``, gradient ``2 w``) over
    ``params``, in float32 at least (a scalar tensor on the parameters' device)."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind={kind!r} is not allowed; choose 'l1' or 'l2'.")
    if not params:
        raise ValueError("weight_penalty needs at least one parameter.")
    terms = []
    for p in params:
        x = p if p.dtype in (torch.float32, torch.float64) else p.float()
        terms.append(x.abs().sum() if kind == "l1" else x.pow(2).sum())
    return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()


def warmup_coefficient(step: int, coefficient: float, warmup_steps: int = 0) -> float:
    """``coefficient * min(1, step / warmup_steps)``: linear warm-up from 0 over ``warmup_steps`` optimizer steps
    (``warmup_steps=0``: the full coefficient from the first step)."""
    if warmup_steps <= 0:
        return float(coefficient)
    return interpolate(0.0, float(coefficient), progress(step, warmup_steps), "linear")


class _WeightPenalty(LeanHooks, Callback):
    kind: PenaltyKind = "l1"
    takes_over: frozenset[str] = frozenset({"loss_term"})  # see lightning_techniques/_internal/conflicts.py

    def __init__(
        self,
        coefficient: float,
        warmup_steps: int = 0,
        include: str | None = None,
        exclude: str | None = None,
        layer_types: list[str] | None = None,
        log: bool = True,
    ) -> None:
        check_number("coefficient", coefficient, low=0.0, low_inclusive=False)
        check_non_negative("warmup_steps", warmup_steps, integer=True)
        _compile("include", include)
        _compile("exclude", exclude)
        _resolve_types(layer_types)
        self.coefficient = float(coefficient)
        self.warmup_steps = warmup_steps
        self.include = include
        self.exclude = exclude
        self.layer_types = list(layer_types) if layer_types is not None else None
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self.term_name = f"{self.kind}_penalty"
        self.parameter_names: list[str] = []
        self.last_coefficient = 0.0
        self._params: list[nn.Parameter] = []
        self._handle: LossTermHandle | None = None

    def current_coefficient(self, trainer: Any) -> float:
        """The coefficient at the trainer's current optimizer step (after the warm-up)."""
        return warmup_coefficient(int(getattr(trainer, "global_step", 0)), self.coefficient, self.warmup_steps)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        selected = penalty_parameters(pl_module, self.include, self.exclude, self.layer_types)
        self.parameter_names = [name for name, _ in selected]
        self._params = [p for _, p in selected]
        if self._handle is None or not self._handle.active:
            self._handle = add_loss_term(pl_module, self.term_name, self._term, log=False)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # the strategy may have replaced parameter objects while moving the model: look them up again
        by_name = dict(pl_module.named_parameters())
        # (a fine-tuning callback later in the list may have wrapped a layer since setup: same parameter, new name)
        self._params = [by_name[current_parameter_name(pl_module, name)] for name in self.parameter_names]

    def _term(self, module: nn.Module, batch: Any, batch_idx: int, loss: torch.Tensor) -> torch.Tensor:
        trainer = getattr(module, "_trainer", None)
        coefficient = self.current_coefficient(trainer) if trainer is not None else self.coefficient
        self.last_coefficient = coefficient
        if coefficient == 0.0:
            value = loss.new_zeros(())
        else:
            value = coefficient * weight_penalty(self._params, self.kind)
        if self._log_enabled:
            log_step_metrics(module, lambda: {f"{self.term_name}/term": value.detach(),
                                              f"{self.term_name}/coefficient": coefficient})
        return value

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._params = []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        return {"last_coefficient": self.last_coefficient}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_coefficient = float(state_dict.get("last_coefficient", 0.0))


class L1Penalty(_WeightPenalty):
    """Adds ``coefficient * sum |w|`` over the chosen weights to the training loss (lasso / L1 regularisation),
    which drives unimportant weights towards exactly zero.

    Tibshirani, "Regression Shrinkage and Selection via the Lasso", JRSS B 1996; for neural networks e.g. Goodfellow,
    Bengio & Courville, "Deep Learning" 2016, sec. 7.1.2. The term is added to the loss ``training_step`` returns
    through the shared loss-term mechanism, so accumulation, AMP scaling and DDP gradient averaging apply to it; its
    gradient is ``coefficient * sign(w)``. The weights of every non-normalisation layer are penalised by default, not
    biases or BatchNorm/LayerNorm parameters.

    Args:
        coefficient: ``lambda`` (> 0).
        warmup_steps: linear warm-up of ``lambda`` from 0 over this many optimizer steps (0: none).
        include: regex on qualified parameter names replacing the default "weights" rule (e.g. ``"^head\\."``).
        exclude: regex of parameter names to leave out.
        layer_types: only parameters of these layer types (names or import paths, e.g. ``["Linear"]``).
        log: log ``l1_penalty/term`` and ``l1_penalty/coefficient`` at the ``log_every_n_steps`` cadence (not
            passed: ``True``; ``False``: log nothing).
        log_values: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(callbacks=[L1Penalty(1e-4, warmup_steps=100)])

    Limits: automatic optimisation only (the loss-term mechanism refuses manual optimisation). With SGD/Adam the
    weights hover around zero rather than landing on it (a proximal step would be needed for exact zeros). For
    *decoupled* weight decay (Loshchilov & Hutter, ICLR 2019) use ``OptimizerCallback("adamw", weight_decay=...)``
    instead of :class:`L2Penalty`.
    """

    kind: PenaltyKind = "l1"
    conflicts_with: tuple[str, ...] = ("L1Penalty",)  # two would register the same loss term

    def __init__(self, coefficient: float = 1e-4, warmup_steps: int = 0, include: str | None = None,
                 exclude: str | None = None, layer_types: list[str] | None = None, log: bool | None = None,
                 log_values: bool | None = None) -> None:
        super().__init__(coefficient, warmup_steps, include, exclude, layer_types,
                         resolve_log_flag("L1Penalty", log, log_values=log_values))


class L2Penalty(_WeightPenalty):
    """Adds ``coefficient * sum w^2`` over the chosen weights to the training loss (ridge / L2 regularisation,
    Tikhonov), shrinking the weights; its gradient is ``2 * coefficient * w``.

    Hoerl & Kennard, "Ridge Regression", Technometrics 1970; Krogh & Hertz, "A Simple Weight Decay Can Improve
    Generalization", NIPS 1992. Added through the shared loss-term mechanism (accumulation, AMP and DDP apply);
    weights only by default, not biases or normalisation parameters (which ``weight_decay=`` of a stock optimizer
    would also decay).

    Args:
        coefficient: ``lambda`` (> 0); with plain SGD it equals ``weight_decay = 2 * lambda``.
        warmup_steps: linear warm-up of ``lambda`` from 0 over this many optimizer steps (0: none).
        include: regex on qualified parameter names replacing the default "weights" rule.
        exclude: regex of parameter names to leave out.
        layer_types: only parameters of these layer types (names or import paths).
        log: log ``l2_penalty/term`` and ``l2_penalty/coefficient`` at the ``log_every_n_steps`` cadence (not
            passed: ``True``; ``False``: log nothing).
        log_values: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(callbacks=[L2Penalty(5e-4)])

    Limits: automatic optimisation only. With adaptive optimizers (Adam) an L2 term in the loss is rescaled per
    weight and is *not* weight decay; decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019) is ``OptimizerCallback("adamw", weight_decay=...)``.
    """

    kind: PenaltyKind = "l2"
    conflicts_with: tuple[str, ...] = ("L2Penalty",)  # two would register the same loss term

    def __init__(self, coefficient: float = 1e-4, warmup_steps: int = 0, include: str | None = None,
                 exclude: str | None = None, layer_types: list[str] | None = None, log: bool | None = None,
                 log_values: bool | None = None) -> None:
        super().__init__(coefficient, warmup_steps, include, exclude, layer_types,
                         resolve_log_flag("L2Penalty", log, log_values=log_values))
