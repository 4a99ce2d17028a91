"""Mixed precision that picks the best dtype for the device, keeps chosen modules in fp32, and exposes the loss
scale and the steps the GradScaler skipped (invisible to callbacks today, upstream #11688).

Micikevicius et al., "Mixed Precision Training", ICLR 2018 (fp16 with loss scaling); Kalamkar et al., "A Study of
BFLOAT16 for Deep Learning Training", 2019 (bf16 without scaling).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_techniques._internal.patching import MethodPatch
from lightning_techniques._internal.step_logging import check_log_flag, should_log_step, write_step_metrics
from lightning_techniques._internal.validation import check_choice, check_positive
from lightning_techniques.optim.guard import MAX_RECORDED_STEPS, NonFiniteTrainingError


# ---------------------------------------------------------------------------------------------- functional core
def best_precision(device: str) -> Literal["bf16-mixed", "16-mixed", "32-true"]:
    """The best mixed precision for ``device`` (``"cuda"``/``"cpu"``/...): bf16 where the hardware supports it,
    else fp16 with a GradScaler on CUDA, else fp32."""
    if device == "cuda" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device == "cpu":
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - torch without mkldnn
            native = False
        return "bf16-mixed" if native else "32-true"
    return "32-true"


def _matches(name: str, module: nn.Module, patterns: Sequence[str]) -> bool:
    cls = type(module)
    for pattern in patterns:
        if pattern in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}") or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def select_modules(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every sub-module whose qualified name matches a glob pattern or whose class name (or
    ``module.ClassName`` path, e.g. ``torch.nn.modules.normalization.LayerNorm``) equals a pattern."""
    return [(n, m) for n, m in model.named_modules() if n and _matches(n, m, patterns)]


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


def keep_in_fp32(module: nn.Module, device_type: str) -> MethodPatch:
    """Run ``module.forward`` with autocast disabled and floating inputs cast to float32 (on this instance only);
    undo with ``.restore()`` on the returned patch."""

    def make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type=device_type, enabled=False):
                return original(*_to_fp32(args), **_to_fp32(kwargs))

        return forward

    return MethodPatch(module, "forward", make_wrapper)


# ---------------------------------------------------------------------------------------------- Lightning plugin
class SmartMixedPrecision(MixedPrecision):
    """Automatic mixed precision that chooses bf16 / fp16+GradScaler / fp32 for the device, keeps chosen modules
    in fp32, and records the loss scale and the optimizer steps the GradScaler skipped.

    Micikevicius et al., "Mixed Precision Training", ICLR 2018 (fp16 + loss scaling); Kalamkar et al., "A Study of
    BFLOAT16 for Deep Learning Training", 2019. Lightning's ``MixedPrecision`` with three additions:

    * ``precision="auto"``: ``bf16-mixed`` where supported (CUDA with bf16, CPUs with native bf16), else
      ``16-mixed`` with a GradScaler (older CUDA GPUs), else ``32-true`` with a warning (autocast off).
    * ``fp32_modules``: sub-modules run with autocast disabled and their floating inputs cast to float32 (numerically
      sensitive parts: norms, losses, a final classifier, attention softmax ...); patterns are glob patterns on
      qualified names (``"head"``, ``"blocks.*.norm1"``) or class names (``"LayerNorm"``). Restored at teardown.
    * Under ``16-mixed``: the loss scale before and after every ``scaler.update()`` tells whether the scaler skipped
      that step (it lowers the scale exactly when it found Inf/NaN and skipped). ``scale_history`` (``(global_step,
      scale)`` after each update, the last ``history_size``), ``skipped_steps`` (the last 1000 skipped global steps),
      ``skipped_total`` and ``consecutive_skips`` are kept (and checkpointed, bounded however long the run); the scale
      and a skip flag (``amp/loss_scale``, ``amp/skipped_step``) are logged at every skip and at the Trainer's
      ``log_every_n_steps`` cadence (and the run's last step), to ``trainer.callback_metrics`` and the loggers, as
      the other techniques' step metrics. ``max_consecutive_skips`` stops the run (``on_limit``) after that many skips
      in a row - a scale collapsing towards 0 means the model produces Inf/NaN in any precision.

    Args:
        precision: ``"auto"``, ``"bf16-mixed"``, ``"16-mixed"`` or ``"32-true"``.
        device: autocast device type (default: ``"cuda"`` when available, else ``"cpu"``).
        fp32_modules: patterns of modules to keep in fp32.
        max_consecutive_skips: stop after this many consecutive skipped steps (``None``: never).
        on_limit: ``"raise"`` (a :class:`NonFiniteTrainingError`) or ``"stop"`` (graceful ``trainer.should_stop``).
        init_scale, growth_interval: GradScaler settings (``16-mixed`` only).
        history_size: how many ``(step, scale)`` entries ``scale_history`` keeps (the most recent; default 10,000).
        log: log ``amp/loss_scale`` and ``amp/skipped_step`` (``False``: log nothing; the history is still kept).

    Example::

        trainer = L.Trainer(plugins=[SmartMixedPrecision("auto", fp32_modules=["LayerNorm", "head"])])

    From YAML: ``trainer: {plugins: [{class_path: lightning_techniques.SmartMixedPrecision, init_args: {...}}]}``.

    Limits: do not also pass ``Trainer(precision=...)``; fused optimizers that unscale internally cannot be
    combined with clipping (as in Lightning); FSDP/DeepSpeed bring their own precision plugins and do not use this
    one; a ``16-mixed`` step skipped by the scaler still counts in ``global_step``.
    """

    takes_over: frozenset[str] = frozenset({"precision"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(
        self,
        precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = "auto",
        device: str | None = None,
        fp32_modules: list[str] | None = None,
        max_consecutive_skips: int | None = None,
        on_limit: Literal["raise", "stop"] = "raise",
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        history_size: int = 10_000,
        log: bool = True,
    ) -> None:
        check_choice("precision", precision, ["auto", "bf16-mixed", "16-mixed", "32-true"])
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not isinstance(device, str) or not device:
            raise TypeError(f"device must be a device type string such as 'cuda' or 'cpu', got {device!r}.")
        if fp32_modules is not None and (
            isinstance(fp32_modules, str) or not all(isinstance(p, str) for p in fp32_modules)
        ):
            raise TypeError(f"fp32_modules must be a list of patterns (strings), got {fp32_modules!r}.")
        if max_consecutive_skips is not None:
            check_positive("max_consecutive_skips", max_consecutive_skips, integer=True)
        check_choice("on_limit", on_limit, ["raise", "stop"])
        check_positive("init_scale", init_scale)
        check_positive("growth_interval", growth_interval, integer=True)
        check_positive("history_size", history_size, integer=True)
        log_enabled = check_log_flag("log", log)
        resolved = best_precision(device) if precision == "auto" else precision
        if precision == "auto" and resolved == "32-true":
            rank_zero_warn(
                f"SmartMixedPrecision: {device!r} supports neither bf16 nor fp16 with a GradScaler well; training in "
                "fp32 (autocast off)."
            )
        scaler = (
            torch.amp.GradScaler(device=device, init_scale=init_scale, growth_interval=growth_interval)
            if resolved == "16-mixed"
            else None
        )
        super().__init__("bf16-mixed" if resolved == "32-true" else resolved, device, scaler)
        self.precision = resolved
        self.requested_precision = precision
        self.fp32_modules = list(fp32_modules) if fp32_modules else None
        self.max_consecutive_skips = max_consecutive_skips
        self.on_limit = on_limit
        self.init_scale = float(init_scale)
        self.growth_interval = growth_interval
        self._log_enabled = log_enabled
        self.history_size = history_size
        self.scale_history: list[tuple[int, float]] = []
        self.skipped_steps: list[int] = []
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.kept_in_fp32: list[str] = []
        self._patches: list[MethodPatch] = []

    # ------------------------------------------------------------------ autocast
    @property
    def autocast_enabled(self) -> bool:
        return self.precision != "32-true"

    def autocast_context_manager(self) -> torch.autocast:
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.half
        return torch.autocast(self.device, dtype=dtype, enabled=self.autocast_enabled, cache_enabled=False)

    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.fp32_modules and not self._patches:
            chosen = select_modules(module, self.fp32_modules)
            if not chosen:
                available = [f"{n} ({type(m).__name__})" for n, m in module.named_modules() if n]
                raise ValueError(
                    f"SmartMixedPrecision: no module matches fp32_modules={self.fp32_modules}. Modules: {available}"
                )
            self._patches = [keep_in_fp32(m, self.device) for _, m in chosen]
            self.kept_in_fp32 = [n for n, _ in chosen]
        return module

    def teardown(self) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
        super().teardown()

    # ------------------------------------------------------------------ skipped steps
    # lightning.pytorch's Precision.optimizer_step(optimizer, model, closure) already narrows the fabric base's
    # optimizer_step(optimizer, **kwargs); mypy reports lightning's own override against the fabric class
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if self.scaler is None:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        before = float(self.scaler.get_scale())
        seen: dict[str, Any] = {}

        def recorded_closure() -> Any:
            seen["result"] = closure()
            return seen["result"]

        output = super().optimizer_step(optimizer, model=model, closure=recorded_closure, **kwargs)
        if seen.get("result") is None and getattr(model, "automatic_optimization", True):
            return output  # training_step returned None: no backward, no scaler step or update
        after = float(self.scaler.get_scale())
        trainer = getattr(model, "_trainer", None)
        step = int(trainer.global_step) if trainer is not None else len(self.scale_history)
        skipped = after < before
        self.scale_history.append((step, after))
        if len(self.scale_history) > self.history_size:
            del self.scale_history[0]
        if skipped:
            self.skipped_steps.append(step)
            if len(self.skipped_steps) > MAX_RECORDED_STEPS:
                del self.skipped_steps[0]
            self.skipped_total += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        if trainer is not None:
            self._log(trainer, model, after, skipped)
            self._check_limit(trainer)
        return output

    def _log(self, trainer: Any, model: Any, scale: float, skipped: bool) -> None:
        # at the cadence every technique logs at, and on every step the scaler skipped (to the loggers too)
        if not self._log_enabled or not (skipped or should_log_step(trainer)):
            return
        write_step_metrics(trainer, model, {"amp/loss_scale": scale, "amp/skipped_step": float(skipped)},
                           to_loggers=skipped)

    def _check_limit(self, trainer: Any) -> None:
        limit = self.max_consecutive_skips
        if limit is None or self.consecutive_skips < limit:
            return
        message = (
            f"SmartMixedPrecision: the GradScaler skipped {self.consecutive_skips} consecutive optimizer steps "
            f"(global steps {self.skipped_steps[-self.consecutive_skips:]}; loss scale now "
            f"{self.scale_history[-1][1]:.3g}): the gradients are Inf/NaN at every scale. Lower the learning rate, "
            "check the data, keep sensitive modules in fp32 (fp32_modules=...), or use bf16."
        )
        if self.on_limit == "raise":
            raise NonFiniteTrainingError(message)
        rank_zero_warn(message + " Stopping the run.")
        trainer.should_stop = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "scale_history": [list(item) for item in self.scale_history],
            "skipped_steps": list(self.skipped_steps),
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "scaler" not in state_dict:  # a plain MixedPrecision checkpoint (scaler state only)
            super().load_state_dict(state_dict)
            return
        if self.scaler is not None and state_dict["scaler"]:
            self.scaler.load_state_dict(state_dict["scaler"])
        self.scale_history = [(int(s), float(v)) for s, v in state_dict.get("scale_history", [])][-self.history_size:]
        self.skipped_steps = [int(s) for s in state_dict.get("skipped_steps", [])][-MAX_RECORDED_STEPS:]
        self.skipped_total = int(state_dict.get("skipped_total", len(self.skipped_steps)))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
