"""Dropout over time and at inference: a schedule of the model's dropout rates during training (curriculum dropout,
warm-up to the target rate) and Monte-Carlo dropout at evaluation (mean and predictive uncertainty over K passes).

Functional cores: :func:`dropout_layers`, :func:`scheduled_dropout`, :func:`mc_dropout_predict`; adapters
:class:`DropoutSchedule` and :class:`MCDropout`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_techniques._internal.batch import get_inputs, get_targets
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.distributed import all_reduce_sum
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.schedule import interpolate, progress
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics, resolve_log_flag
from lightning_techniques._internal.validation import check_number, check_positive

DropoutScheduleKind = Literal["linear", "curriculum"]
MCStage = Literal["validate", "test", "predict"]


def dropout_layers(model: nn.Module, include: Sequence[str] | None = None) -> list[tuple[str, _DropoutNd]]:
    """``(name, layer)`` of every dropout layer of ``model`` (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``
    ...), restricted to glob patterns ``include`` on qualified names. Raises ``ValueError`` listing the model's
    layers when there is none."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _DropoutNd)
             and (not include or any(fnmatch.fnmatchcase(n, p) for p in include))]
    if not found:
        layers = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n]
        raise ValueError(f"no dropout layer (nn.Dropout / Dropout1d/2d/3d / AlphaDropout) matches include={include}. "
                         f"Layers in the model: {layers}")
    return found


def scheduled_dropout(step: int, target: float, steps: int, start: float = 0.0,
                      schedule: DropoutScheduleKind = "linear", gamma: float | None = None) -> float:
    """The dropout rate at optimizer step ``step``.

    ``"linear"``: ``start + (target - start) * min(1, step / steps)`` (warm-up to the target rate);
    ``"curriculum"`` (Morerio et al. 2017): ``start + (target - start) * (1 - exp(-gamma * step))`` with
    ``gamma = 5 / steps`` by default (99.3 % of the way at ``steps``).
    """
    if schedule == "linear":
        return interpolate(start, target, progress(step, steps), "linear")
    if schedule == "curriculum":  # saturating in the step count itself (not clipped at ``steps``)
        rate = gamma if gamma is not None else 5.0 / steps
        return interpolate(start, target, float(max(step, 0)), "saturating", rate=rate)
    raise ValueError(f"schedule={schedule!r} is not allowed; choose one of {list(get_args(DropoutScheduleKind))}.")


class DropoutSchedule(LeanHooks, Callback):
    """Schedules the rate ``p`` of the model's dropout layers over training: a linear warm-up from ``start`` to the
    target, or curriculum dropout's exponential approach (Morerio, Cavazza, Volpi, Vidal & Murino, "Curriculum
    Dropout", ICCV 2017: little dropout while the network learns easy features, more later).

    The rate is set on every chosen layer before each training batch from the optimizer step (so a resumed run
    continues the same schedule), and every layer's own ``p`` is put back at teardown or on an exception. By
    default each layer's target is its own configured ``p`` (``target=None``); ``target=`` sets one rate for all.
    Evaluation is unaffected (dropout is off in eval mode).

    Args:
        target: final rate for every chosen layer, in ``[0, 1)`` (None: each layer's own ``p``).
        start: rate at step 0 (default 0: no dropout at first).
        steps: optimizer steps of the warm-up (``"linear"``) or the horizon of ``"curriculum"``.
        schedule: ``"linear"`` or ``"curriculum"``.
        gamma: curriculum's rate (default ``5 / steps``).
        include: glob patterns on qualified layer names to restrict to (default: every dropout layer).
        log: log ``dropout_schedule/p`` (mean rate) at the ``log_every_n_steps`` cadence (not passed: ``True``;
            ``False``: log nothing).
        log_values: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(callbacks=[DropoutSchedule(steps=1000, schedule="curriculum")])
        trainer.fit(DigitsCNN(dropout=0.5), datamodule=DigitsDataModule())

    Limits: refuses a model without dropout layers (in ``setup``); functional dropout (``F.dropout`` in
    ``forward``) is not seen.
    """

    takes_over: frozenset[str] = frozenset()  # changes only the rate attribute of dropout layers
    conflicts_with: tuple[str, ...] = ("DropoutSchedule",)  # two would set the same rates

    def __init__(self, target: float | None = None, start: float = 0.0, steps: int = 1000,
                 schedule: DropoutScheduleKind = "linear", gamma: float | None = None,
                 include: list[str] | None = None, log: bool | None = None, log_values: bool | None = None) -> None:
        log_enabled = resolve_log_flag("DropoutSchedule", log, log_values=log_values)
        if target is not None:
            check_number("target", target, low=0.0, high=1.0, high_inclusive=False)
        check_number("start", start, low=0.0, high=1.0, high_inclusive=False)
        check_positive("steps", steps, integer=True)
        if schedule not in get_args(DropoutScheduleKind):
            raise ValueError(f"schedule={schedule!r} is not allowed; choose one of "
                             f"{list(get_args(DropoutScheduleKind))}.")
        if gamma is not None:
            check_positive("gamma", gamma)
        if include is not None and (not isinstance(include, (list, tuple)) or
                                    not all(isinstance(p, str) for p in include)):
            raise TypeError(f"include must be a list of glob patterns, got {include!r}.")
        self.target = target
        self.start = float(start)
        self.steps = steps
        self.schedule = schedule
        self.gamma = gamma
        self.include = list(include) if include else None
        self._log_enabled = log_enabled  # not ``self.log``: Lightning assigns that before setup
        self.current_p: float = float(start)
        self._layers: list[tuple[_DropoutNd, float]] = []  # (layer, its own p)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        self._layers = [(layer, float(layer.p)) for _, layer in dropout_layers(pl_module, self.include)]

    def rates(self, step: int) -> list[float]:
        """The rate of each chosen layer at optimizer step ``step``."""
        return [scheduled_dropout(step, own if self.target is None else self.target, self.steps, self.start,
                                  self.schedule, self.gamma) for _, own in self._layers]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        rates = self.rates(trainer.global_step)
        for (layer, _), p in zip(self._layers, rates):
            layer.p = p
        self.current_p = sum(rates) / len(rates) if rates else self.start
        if self._log_enabled:
            log_step_metrics(pl_module, {"dropout_schedule/p": self.current_p})

    def _restore(self) -> None:
        for layer, own in self._layers:
            layer.p = own
        self._layers = []

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def state_dict(self) -> dict[str, Any]:
        return {"current_p": self.current_p}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_p = float(state_dict.get("current_p", self.start))


@torch.no_grad()
def mc_dropout_predict(
    model: nn.Module,
    inputs: Any,
    num_samples: int = 20,
    *,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Monte-Carlo dropout (Gal & Ghahramani 2016): ``num_samples`` forward passes with the dropout layers active
    (everything else - batch norm included - in eval mode), softmax over the class dimension 1.

    Returns ``mean`` (mean class probabilities ``[B, K]``), ``entropy`` (predictive entropy ``H[mean]``),
    ``expected_entropy`` (``E_k H[p_k]``), ``mutual_info`` (their difference: the model's epistemic uncertainty),
    ``std`` (per-class std of the probabilities over passes). The modules' modes are restored afterwards; with
    ``seed`` the dropout masks come from a forked random state seeded with it (the global one is not touched).
    """
    check_positive("num_samples", num_samples, integer=True)
    layers = dropout_layers(model)
    modes = [(m, m.training) for m in model.modules()]
    forward = forward_fn or (lambda module, x: module(x))
    ref = next(iter(model.parameters()), None)
    devices = [ref.device] if ref is not None and ref.device.type == "cuda" else []
    try:
        model.eval()
        for _, layer in layers:
            layer.train()
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            probs = torch.stack([forward(model, inputs).float().softmax(dim=1) for _ in range(num_samples)])
    finally:
        for module, mode in modes:
            module.training = mode
    mean = probs.mean(dim=0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=1)
    expected_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=2).mean(dim=0)
    return {"mean": mean, "entropy": entropy, "expected_entropy": expected_entropy,
            "mutual_info": (entropy - expected_entropy).clamp_min(0.0), "std": probs.std(dim=0, unbiased=False)}


class MCDropout(LeanHooks, Callback):
    """Monte-Carlo dropout at evaluation: for every test (and chosen validation / predict) batch, ``num_samples``
    stochastic forward passes with the model's dropout layers active; the mean prediction's accuracy and NLL and
    the predictive uncertainty (entropy, mutual information) are logged.

    Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning", ICML
    2016. The user's ``test_step`` runs unchanged (its metrics are the deterministic ones); this callback does its
    passes in ``on_<stage>_batch_end`` on the batch ``test_step`` received (after the batch-transfer hooks), with
    only the dropout layers switched to train mode (batch norm keeps its running statistics), modes restored after.
    Per epoch it logs ``mc_dropout/<stage>_acc``, ``_nll``, ``_entropy``, ``_mutual_info`` (sums all-reduced over
    DDP ranks, so every rank logs the same values). In ``predict`` nothing can be logged: each batch's result
    (``mean``, ``entropy``, ``mutual_info`` on the CPU) is appended to ``self.predictions``. The masks come from a
    random state forked and seeded per batch (``seed``, batch index, rank): reproducible, global state untouched.

    Args:
        num_samples: stochastic passes per batch (K).
        stages: where to run: any of ``"validate"``, ``"test"``, ``"predict"``.
        seed: base seed of the dropout masks.
        input_key, target_key: where input and target are in a dict/tuple batch (default: elements 0 and 1).
        forward_fn: ``forward_fn(module, batch) -> logits`` (the whole batch) when the forward is not
            ``module(inputs)``.
        log: log the ``mc_dropout/<stage>_*`` metrics (``False``: log nothing; ``last_metrics`` and
            ``predictions`` are still kept).

    Example::

        trainer = L.Trainer(callbacks=[MCDropout(num_samples=30)])
        trainer.test(DigitsCNN(dropout=0.3), datamodule=DigitsDataModule())

    Limits: classification logits ``[B, K]`` (softmax over dim 1); refuses a model without dropout layers (in
    ``setup``); costs ``num_samples`` extra forward passes per evaluated batch.
    """

    takes_over: frozenset[str] = frozenset({"eval_hooks"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, num_samples: int = 20, stages: list[MCStage] | None = None, seed: int = 0,
                 input_key: str | int | None = None, target_key: str | int | None = None,
                 forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, log: bool = True) -> None:
        check_number("num_samples", num_samples, low=2, integer=True)
        stages = ["test", "predict"] if stages is None else stages
        if not isinstance(stages, (list, tuple)) or not stages:
            raise TypeError(f"stages must be a non-empty list of {list(get_args(MCStage))}, got {stages!r}.")
        bad = [s for s in stages if s not in get_args(MCStage)]
        if bad:
            raise ValueError(f"stages {bad} are not allowed; choose from {list(get_args(MCStage))}.")
        check_number("seed", seed, low=0, integer=True)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}.")
        self.num_samples = num_samples
        self.stages = list(stages)
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.forward_fn = forward_fn
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self.predictions: list[dict[str, torch.Tensor]] = []
        self.last_metrics: dict[str, float] = {}
        self._sums: torch.Tensor | None = None  # correct, nll, entropy, mutual info, count

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        wanted = {"fit": "validate", "validate": "validate", "test": "test", "predict": "predict"}.get(stage)
        if wanted not in self.stages:
            return
        if stage == "fit":
            check_conflicts(trainer, self)
        dropout_layers(pl_module)  # refuse a model without dropout before anything runs

    # ------------------------------------------------------------------------------------------- the MC passes
    def _passes(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> dict:
        inputs = batch if self.forward_fn is not None else get_inputs(batch, self.input_key)
        seed = self.seed * 1_000_003 + batch_idx * 1009 + dataloader_idx * 101 + trainer.global_rank
        return mc_dropout_predict(pl_module, inputs, self.num_samples, forward_fn=self.forward_fn, seed=seed)

    def _accumulate(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        result = self._passes(trainer, pl_module, batch, batch_idx, dataloader_idx)
        mean = result["mean"]
        target = get_targets(batch, self.target_key)
        hard = target.argmax(dim=1) if target.is_floating_point() and target.ndim == 2 else target.long()
        nll = -mean.gather(1, hard[:, None]).squeeze(1).clamp_min(1e-12).log()
        row = torch.stack([(mean.argmax(dim=1) == hard).float().sum(), nll.sum(), result["entropy"].sum(),
                           result["mutual_info"].sum(), torch.tensor(float(len(hard)), device=mean.device)])
        row = row.double()
        self._sums = row if self._sums is None else self._sums + row

    def _publish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # every rank takes part in the reduction, also one that evaluated no batch (no collective left hanging)
        local = self._sums if self._sums is not None else torch.zeros(5, dtype=torch.float64, device=pl_module.device)
        sums = all_reduce_sum(trainer.strategy, local)
        self._sums = None
        count = float(sums[4])
        if count == 0:
            return
        values = {"acc": sums[0], "nll": sums[1], "entropy": sums[2], "mutual_info": sums[3]}
        self.last_metrics = {f"mc_dropout/{stage}_{k}": float(v) / count for k, v in values.items()}
        if not self._log_enabled:
            return
        has_logger = bool(getattr(trainer, "loggers", None))
        for key, value in self.last_metrics.items():
            pl_module.log(key, value, logger=has_logger)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if "validate" in self.stages and not trainer.sanity_checking:
            self._accumulate(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "validate" in self.stages and not trainer.sanity_checking:
            self._publish(trainer, pl_module, "val")

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if "test" in self.stages:
            self._accumulate(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "test" in self.stages:
            self._publish(trainer, pl_module, "test")

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.predictions = []

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if "predict" in self.stages:
            result = self._passes(trainer, pl_module, batch, batch_idx, dataloader_idx)
            self.predictions.append({k: result[k].cpu() for k in ("mean", "entropy", "mutual_info")})

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._sums = None

    def state_dict(self) -> dict[str, Any]:
        return {"last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
