"""Gaussian weight noise during training: gradients are taken at perturbed weights and applied to the clean ones.

Functional core :func:`perturb_weights_` / :func:`restore_weights_`; adapter :class:`WeightNoise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal import compat
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.patching import MethodPatch
from lightning_techniques._internal.step_logging import log_step_metrics, resolve_log_flag
from lightning_techniques._internal.validation import check_number, check_positive
from lightning_techniques.finetune._peft import current_parameter_name
from lightning_techniques.regularization.penalties import _compile, _resolve_types, penalty_parameters

NoiseMode = Literal["additive", "multiplicative"]


@torch.no_grad()
def perturb_weights_(
    params: Sequence[torch.Tensor],
    std: float,
    mode: NoiseMode = "additive",
    generator: torch.Generator | None = None,
    clean: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Add Gaussian noise to ``params`` in place and return their clean values (into ``clean`` when given, so the
    copies are allocated once): ``w + std * eps`` (``"additive"``) or ``w * (1 + std * eps)``
    (``"multiplicative"``), ``eps ~ N(0, 1)`` drawn from ``generator``."""
    if mode not in get_args(NoiseMode):
        raise ValueError(f"mode={mode!r} is not allowed; choose one of {list(get_args(NoiseMode))}.")
    if clean is None:
        clean = [p.detach().clone() for p in params]
    else:
        for buffer, p in zip(clean, params):
            buffer.copy_(p)
    for p in params:
        eps = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        if mode == "additive":
            p.add_(eps, alpha=std)
        else:
            p.addcmul_(p, eps, value=std)
    return clean


@torch.no_grad()
def restore_weights_(params: Sequence[torch.Tensor], clean: Sequence[torch.Tensor]) -> None:
    """Copy the clean values back into ``params`` (in place; gradients are left alone)."""
    for p, c in zip(params, clean):
        p.copy_(c)


class WeightNoise(LeanHooks, Callback):
    """Gaussian noise on the weights for each training forward/backward pass; the optimizer steps the clean weights.

    Graves, "Practical Variational Inference for Neural Networks", NIPS 2011 (and earlier Murray & Edwards 1994, An
    1996, Jim, Giles & Horne 1996): the loss is evaluated at ``w + noise``, a regulariser that favours flat minima.
    When ``training_step`` is called (through a reversible patch of the module instance's ``training_step``, so after
    every ``on_train_batch_start`` hook - an initialisation such as :class:`LSUVInit` on the first batch is kept) the
    chosen weights are perturbed in place (their clean values saved in buffers allocated once); in
    ``on_before_optimizer_step`` - after the backward pass, before the step - the clean values are
    put back, so the gradient taken at the noisy weights updates the clean ones, and checkpoints, validation and the
    weights after ``fit`` never hold noise. Micro-batches of gradient accumulation each get fresh noise (restored at
    their batch end). Noise comes from a generator seeded by ``(seed, step, batch, rank)``: reproducible, exact on
    resume, different per DDP rank (the averaged gradient then averages over the ranks' noise). An exception mid-step
    restores the clean weights.

    Args:
        std: noise scale (``"additive"``: absolute standard deviation; ``"multiplicative"``: relative to ``|w|``).
        mode: ``"additive"`` (``w + std * eps``) or ``"multiplicative"`` (``w * (1 + std * eps)``).
        include, exclude, layer_types: which parameters, as for :class:`L1Penalty` (default: the weights of every
            non-normalisation layer, not biases).
        seed: base seed of the noise.
        log: log ``weight_noise/relative_norm`` (``||noise|| / ||w||``) at the ``log_every_n_steps`` cadence (not
            passed: ``True``; ``False``: log nothing).
        log_values: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(callbacks=[WeightNoise(std=0.01)])

    Limits: refuses FSDP/DeepSpeed (sharded weights); with L-BFGS the closure's re-evaluations after the first see
    the clean weights; another callback reading the weights in ``on_before_optimizer_step`` before this one (order
    of ``callbacks``) sees the noisy ones.
    """

    takes_over: frozenset[str] = frozenset({"optimizer_step"})  # acts around the optimizer step
    conflicts_with: tuple[str, ...] = ("WeightNoise",)  # two would perturb and restore the same weights

    def __init__(self, std: float = 0.01, mode: NoiseMode = "additive", include: str | None = None,
                 exclude: str | None = None, layer_types: list[str] | None = None, seed: int = 0,
                 log: bool | None = None, log_values: bool | None = None) -> None:
        log_enabled = resolve_log_flag("WeightNoise", log, log_values=log_values)
        check_positive("std", std)
        if mode not in get_args(NoiseMode):
            raise ValueError(f"mode={mode!r} is not allowed; choose one of {list(get_args(NoiseMode))}.")
        _compile("include", include)
        _compile("exclude", exclude)
        _resolve_types(layer_types)
        check_number("seed", seed, low=0, integer=True)
        self.std = float(std)
        self.mode = mode
        self.include = include
        self.exclude = exclude
        self.layer_types = list(layer_types) if layer_types is not None else None
        self.seed = seed
        self._log_enabled = log_enabled  # not ``self.log``: Lightning assigns that before setup
        self.parameter_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._clean: list[torch.Tensor] | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._perturbed = False
        self._patch: MethodPatch | None = None
        self._batch_seed: int | None = None
        self._pl_module: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        if compat.shards_parameters(trainer.strategy):
            raise ValueError(f"WeightNoise does not support {type(trainer.strategy).__name__} (sharded weights).")
        self.parameter_names = [n for n, _ in penalty_parameters(pl_module, self.include, self.exclude,
                                                                 self.layer_types)]
        if self._patch is None or not self._patch.active:
            self._patch = MethodPatch(pl_module, "training_step", self._make_wrapper)

    def _make_wrapper(self, call_next: Any) -> Any:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._perturb()
            return call_next(*args, **kwargs)

        return training_step

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        by_name = dict(pl_module.named_parameters())  # looked up after the strategy moved the model
        # (a fine-tuning callback later in the list may have wrapped a layer since setup: same parameter, new name)
        self._params = [by_name[current_parameter_name(pl_module, n)] for n in self.parameter_names]
        self._clean = [p.detach().clone() for p in self._params]
        self._generators = {}

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_seed = (self.seed * 1_000_003 + trainer.global_step * 9_176 + batch_idx * 131
                            + trainer.global_rank) % 2**62
        self._pl_module = pl_module

    def _perturb(self) -> None:
        if self._perturbed or not self._params or self._batch_seed is None:
            return
        seed, pl_module = self._batch_seed, self._pl_module
        devices = {p.device for p in self._params}
        if len(devices) == 1:
            perturb_weights_(self._params, self.std, self.mode, self._generator(next(iter(devices)), seed),
                             self._clean)
        else:  # model spread over devices: one generator per device, seeded alike
            for p, c in zip(self._params, self._clean or []):
                perturb_weights_([p], self.std, self.mode, self._generator(p.device, seed), [c])
        self._perturbed = True
        if self._log_enabled:
            log_step_metrics(pl_module, self._relative_norm)

    @torch.no_grad()
    def _relative_norm(self) -> dict[str, torch.Tensor]:
        assert self._clean is not None
        noise = torch.stack([torch.linalg.vector_norm((p - c).float()) for p, c in zip(self._params, self._clean)])
        clean = torch.stack([torch.linalg.vector_norm(c.float()) for c in self._clean])
        return {"weight_noise/relative_norm": noise.norm() / clean.norm().clamp_min(1e-12)}

    def _restore(self) -> None:
        if self._perturbed and self._clean is not None:
            restore_weights_(self._params, self._clean)
        self._perturbed = False
        self._batch_seed = None  # one perturbation per training batch

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._restore()  # the gradient of the noisy weights updates the clean ones

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._restore()  # micro-batches that did not step (accumulation)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()
        self._release()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._restore()
            self._release()

    def _release(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        self._params, self._clean, self._generators = [], None, {}
        self._batch_seed, self._pl_module = None, None

    def state_dict(self) -> dict[str, Any]:
        return {"std": self.std, "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the noise is a function of (seed, step, batch, rank): nothing to restore
