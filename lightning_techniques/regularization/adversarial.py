"""Adversarial training (FGSM / PGD) and virtual adversarial training (VAT) as loss terms.

Functional core (plain PyTorch): :func:`input_gradient` (the gradient of a loss with respect to the *input only*,
with a loss scale for fp16), :func:`fgsm`, :func:`pgd`, :func:`vat_perturbation`, :func:`vat_loss` and the context
manager :func:`preserved_batchnorm_stats`. Adapters: :class:`AdversarialTraining` and
:class:`VirtualAdversarialTraining`, which add their loss to the loss ``training_step`` returns through the shared
loss-term mechanism (``ARCHITECTURE.md`` section 4).

Design notes (the same in the core and the adapters):

* **Input gradients only.** Every gradient is taken with ``torch.autograd.grad(loss, x)``: the parameters' ``.grad``
  is never touched, so the optimizer sees exactly the gradient of ``clean loss + weight * adversarial loss``.
* **BatchNorm statistics.** The attack's forwards (and VAT's clean-prediction forward) run with every training-mode
  BatchNorm layer's running statistics swapped for throw-away copies (:func:`preserved_batchnorm_stats`); the
  forward of the adversarial loss too, so the running statistics are those of the user's clean forward only.
* **Model mode.** Examples are generated in the model's current mode: during training that is training mode
  (dropout active, BatchNorm on batch statistics), as in Madry et al.'s training loop.
* **AMP.** Under ``16-mixed`` the attack loss is multiplied by a loss scale before the input gradient is taken (and
  the scale is lowered on overflow), because small input gradients underflow in fp16 while their sign (FGSM/PGD) or
  direction (VAT) does not depend on the scale. VAT's power iteration runs outside autocast (in the parameters'
  dtype): its finite difference ``x + xi * d`` with ``xi = 1e-6`` is rounded away by fp16 / bf16 inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal.batch import get_inputs, get_targets
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.criterion import find_criterion
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.loss_terms import LossTermHandle, add_loss_term
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics, resolve_log_flag
from lightning_techniques._internal.validation import check_choice, check_number, check_positive

AttackNorm = Literal["linf", "l2"]
AttackMethod = Literal["fgsm", "pgd"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Loss scale used for the input gradients under fp16 precisions (as GradScaler's initial scale).
FP16_GRAD_SCALE = 2.0**16


# ---------------------------------------------------------------------------------------------------- functional core
@contextlib.contextmanager
def preserved_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, forwards of ``model`` leave the running statistics of its BatchNorm layers untouched.

    Training-mode BatchNorm layers that track running statistics get throw-away copies of ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` for the block (they still normalise with the batch statistics, as in
    any training forward); the original tensor objects are put back afterwards, unchanged - also on an exception.
    Layers in eval mode do not update their statistics and are left alone.
    """
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = module._buffers.get(name)
                if buffer is not None:
                    saved.append((module, name, buffer))
                    module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer


def _bn_guard(model: nn.Module, preserve_bn_stats: bool) -> contextlib.AbstractContextManager[None]:
    return preserved_batchnorm_stats(model) if preserve_bn_stats else contextlib.nullcontext()


def input_gradient(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   grad_scale: float = 1.0) -> torch.Tensor:
    """``d loss_fn(x) / d x`` through ``torch.autograd.grad`` (no parameter's ``.grad`` is touched).

    ``grad_scale`` > 1 multiplies the loss before the backward pass and divides the gradient afterwards, so small
    gradients survive fp16 activations; on a non-finite gradient the scale is divided by 256 and the gradient taken
    again (down to 1). Returns a detached tensor like ``x``.
    """
    check_positive("grad_scale", grad_scale)
    scale = float(grad_scale)
    while True:
        z = x.detach().requires_grad_(True)
        loss = loss_fn(z)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r}.")
        (grad,) = torch.autograd.grad(loss.reshape(()) * scale if scale != 1.0 else loss.reshape(()), z)
        if scale <= 1.0 or bool(torch.isfinite(grad).all()):
            return grad.detach() / scale if scale != 1.0 else grad.detach()
        scale = max(1.0, scale / 256.0)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is in a lower precision (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(_upcast(t.flatten(1)), dim=1).view(-1, *([1] * (t.ndim - 1)))


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every example (first dimension) scaled to unit L2 norm (zero examples stay zero). Divides by the
    largest magnitude first, so tiny gradients (VAT's are ~1e-13) are normalised without underflow."""
    u = _upcast(t)
    tiny = torch.finfo(u.dtype).tiny
    peak = u.flatten(1).abs().amax(dim=1).view(-1, *([1] * (t.ndim - 1))).clamp_min(tiny)
    u = u / peak
    return (u / _per_example_norm(u).clamp_min(tiny)).to(t.dtype)


def _check_norm(norm: str) -> None:
    check_choice("norm", norm, get_args(AttackNorm))


def _check_range(input_range: tuple[float, float] | list[float] | None) -> tuple[float, float] | None:
    if input_range is None:
        return None
    if not isinstance(input_range, (tuple, list)) or len(input_range) != 2:
        raise TypeError(f"input_range must be None or a pair [low, high], got {input_range!r}.")
    low, high = (check_number("input_range", v) for v in input_range)
    if not low < high:
        raise ValueError(f"input_range must have low < high, got {list(input_range)}.")
    return float(low), float(high)


def _clamp(x: torch.Tensor, input_range: tuple[float, float] | None) -> torch.Tensor:
    return x if input_range is None else x.clamp(input_range[0], input_range[1])


def _step(grad: torch.Tensor, size: float, norm: str) -> torch.Tensor:
    return size * (grad.sign() if norm == "linf" else _unit(grad))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (_upcast(delta) * factor).to(delta.dtype)


def fgsm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
         eps: float, *, norm: AttackNorm = "linf", input_range: tuple[float, float] | None = None,
         grad_scale: float = 1.0, preserve_bn_stats: bool = True) -> torch.Tensor:
    """The fast gradient sign method: ``x + eps * sign(d loss_fn(model(x), y) / d x)`` (Goodfellow, Shlens & Szegedy,
    "Explaining and Harnessing Adversarial Examples", ICLR 2015); with ``norm="l2"`` the fast gradient method
    ``x + eps * g / ||g||_2`` per example.

    ``input_range``: clamp the result to ``[low, high]`` (e.g. ``(0, 1)`` for images). Runs ``model`` in its current
    mode; BatchNorm running statistics are left untouched (``preserve_bn_stats``). Returns a detached tensor.
    """
    check_positive("eps", eps)
    _check_norm(norm)
    rng = _check_range(input_range)
    with _bn_guard(model, preserve_bn_stats) if isinstance(model, nn.Module) else contextlib.nullcontext():
        grad = input_gradient(lambda z: loss_fn(model(z), y), x, grad_scale)
    return _clamp(x.detach() + _step(grad, eps, norm), rng).detach()


def pgd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
        eps: float, alpha: float | None = None, steps: int = 10, random_start: bool = True,
        norm: AttackNorm = "linf", *, input_range: tuple[float, float] | None = None,
        generator: torch.Generator | None = None, grad_scale: float = 1.0,
        preserve_bn_stats: bool = True) -> torch.Tensor:
    """Projected gradient descent on the negative loss (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep
    Learning Models Resistant to Adversarial Attacks", ICLR 2018).

    ``steps`` steps of size ``alpha`` (default ``2.5 * eps / steps``, the paper's choice) along the gradient's sign
    (``"linf"``) or its L2 direction (``"l2"``), each followed by the projection onto the ``eps``-ball around ``x``
    and, with ``input_range``, onto the valid inputs. ``random_start``: start at a uniform point of the ball (L-inf:
    ``U(-eps, eps)`` per element; L2: uniform in the ball), drawn from ``generator`` (seed it for reproducible
    examples). Runs ``model`` in its current mode, BatchNorm running statistics untouched. Returns a detached tensor.
    """
    check_positive("eps", eps)
    check_positive("steps", steps, integer=True)
    _check_norm(norm)
    rng = _check_range(input_range)
    if alpha is None:
        alpha = 2.5 * eps / steps
    check_positive("alpha", alpha)
    x = x.detach()
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) * 2 - 1) * eps
        else:
            direction = _unit(torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32))
            u = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=generator, device=x.device)
            delta = direction * eps * u.pow(1.0 / max(1, x[0].numel()))
        delta = delta.to(x.dtype)
        delta = _clamp(x + delta, rng) - x
    else:
        delta = torch.zeros_like(x)
    with _bn_guard(model, preserve_bn_stats) if isinstance(model, nn.Module) else contextlib.nullcontext():
        for _ in range(steps):
            grad = input_gradient(lambda z: loss_fn(model(z), y), x + delta, grad_scale)
            delta = _project(delta + _step(grad, alpha, norm), eps, norm)
            delta = _clamp(x + delta, rng) - x
    return (x + delta).detach()


def _kl_from_log_probs(log_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || softmax(logits_q))`` averaged over the batch (``log_p``: the reference's log-probabilities)."""
    log_q = F.log_softmax(_upcast(logits_q), dim=-1)
    log_p = log_p.to(log_q.dtype)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def _autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    device_type = x.device.type
    if device_type in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def vat_perturbation(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, xi: float = 1e-6,
                     eps: float = 1.0, power_iterations: int = 1, *, logits: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, grad_scale: float = 1.0,
                     preserve_bn_stats: bool = True) -> torch.Tensor:
    """The virtual adversarial perturbation ``r_adv = eps * d`` of Miyato, Maeda, Koyama & Ishii, "Virtual Adversarial
    Training", TPAMI 2018: ``d`` (unit L2 norm per example) approximates the dominant eigenvector of the Hessian of
    ``KL(p(y|x) || p(y|x + r))`` at ``r = 0``, found by ``power_iterations`` steps of
    ``d <- normalize(grad_d KL(p(y|x) || p(y|x + xi * d)))`` from a random ``d`` (drawn from ``generator``).

    ``logits``: the model's logits at ``x`` if already computed (detached here); otherwise one extra forward without
    gradients. The power iteration runs outside autocast (the ``xi * d`` finite difference would be rounded away in
    fp16/bf16). Returns a detached tensor like ``x``.
    """
    check_positive("xi", xi)
    check_positive("eps", eps)
    check_positive("power_iterations", power_iterations, integer=True)
    x = x.detach()
    guard = _bn_guard(model, preserve_bn_stats) if isinstance(model, nn.Module) else contextlib.nullcontext()
    autocast_off = _autocast_off(x)
    with guard, autocast_off:
        # the reference p(y|x) in the precision of the power iteration's forwards: a reference from autocast
        # forwards differs from them by more than xi moves them
        if logits is None or not isinstance(autocast_off, contextlib.nullcontext):
            with torch.no_grad():
                logits = model(x)
        log_p = F.log_softmax(_upcast(logits.detach()), dim=-1)
        d = _unit(torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)).to(x.dtype)
        for _ in range(power_iterations):
            # the gradient with respect to r = xi * d (at r = xi * d): xi * H d, along H d
            grad = input_gradient(lambda r: _kl_from_log_probs(log_p, model(x + r)), xi * d, grad_scale)
            d = _unit(grad)
    return (eps * d).detach()


def vat_loss(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, xi: float = 1e-6, eps: float = 1.0,
             power_iterations: int = 1, *, logits: torch.Tensor | None = None,
             generator: torch.Generator | None = None, input_range: tuple[float, float] | None = None,
             grad_scale: float = 1.0, preserve_bn_stats: bool = True) -> torch.Tensor:
    """The local distributional smoothness loss ``KL(p(y|x) || p(y|x + r_adv))`` of VAT (Miyato et al. 2018),
    averaged over the batch, with ``p(y|x)`` held constant and ``r_adv`` from :func:`vat_perturbation`; differentiable
    with respect to the model's parameters. Needs no labels. ``input_range`` clamps ``x + r_adv``."""
    rng = _check_range(input_range)
    guard = _bn_guard(model, preserve_bn_stats) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with guard:
        if logits is None:
            with torch.no_grad():
                logits = model(x.detach())
        r_adv = vat_perturbation(model, x, xi, eps, power_iterations, logits=logits, generator=generator,
                                 grad_scale=grad_scale, preserve_bn_stats=False)
        log_p = F.log_softmax(_upcast(logits.detach()), dim=-1)
        return _kl_from_log_probs(log_p, model(_clamp(x.detach() + r_adv, rng)))


# ---------------------------------------------------------------------------------------------------- adapters
def _is_fp16(trainer: Any) -> bool:
    return str(getattr(trainer, "precision", "32-true")) in ("16-mixed", "16-true", "16")


class _AdversarialTerm(LeanHooks, Callback):
    takes_over: frozenset[str] = frozenset({"loss_term"})  # see lightning_techniques/_internal/conflicts.py
    term_name = "adversarial"

    def _init_common(self, weight: float, input_range: Any, input_key: str | int | None, seed: int,
                     log: bool) -> None:
        check_number("weight", weight, low=0.0)
        check_number("seed", seed, low=0, integer=True)
        if input_key is not None and not isinstance(input_key, (str, int)):
            raise TypeError(f"input_key must be None, a key or an index, got {input_key!r}.")
        self.weight = float(weight)
        self.input_range = _check_range(input_range)
        self.input_key = input_key
        self.seed = seed
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self._handle: LossTermHandle | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._grad_scale = 1.0

    def batch_seed(self, step: int, batch_idx: int, rank: int) -> int:
        """The seed of the random start / direction of training batch ``batch_idx`` at optimizer step ``step`` on
        rank ``rank``: a pure function of them, so a resumed run draws exactly what the straight run drew."""
        return (self.seed * 1_000_003 + step * 9_176 + batch_idx * 131 + rank * 7_919 + 17) % 2**62

    def _generator(self, module: Any, batch_idx: int, device: torch.device) -> torch.Generator:
        trainer = getattr(module, "_trainer", None)
        step = int(getattr(trainer, "global_step", 0)) if trainer is not None else 0
        rank = int(getattr(trainer, "global_rank", 0)) if trainer is not None else 0
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(self.batch_seed(step, batch_idx, rank))

    def _setup_term(self, trainer: Any, pl_module: Any) -> None:
        self._grad_scale = FP16_GRAD_SCALE if _is_fp16(trainer) else 1.0
        if self._handle is None or not self._handle.active:
            self._handle = add_loss_term(pl_module, self.term_name, self._term, log=False)

    def _term(self, module: nn.Module, batch: Any, batch_idx: int, loss: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _inputs(self, batch: Any) -> torch.Tensor:
        x = get_inputs(batch, self.input_key)
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} perturbs the batch's input, which must be a floating-point tensor; got "
                f"{x.dtype} (token ids or other discrete inputs cannot be perturbed). Use input_key=... to name "
                "a continuous input."
            )
        return x

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._generators = {}

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}  # every draw is a function of (seed, step, batch, rank): nothing else to keep

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class AdversarialTraining(_AdversarialTerm):
    """Adds ``weight * loss(model(x_adv), y)`` on FGSM or PGD adversarial examples of each training batch to the
    training loss.

    Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015 (FGSM; their objective
    ``a * J(x) + (1 - a) * J(x_adv)`` is ``weight = (1 - a) / a`` here, up to a constant factor); Madry, Makelov,
    Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (PGD). The
    term is added to the loss ``training_step`` returns through the shared loss-term mechanism, so gradient
    accumulation, AMP scaling and DDP averaging apply to it. The examples are made from the batch's input (element 0
    of a tuple batch, ``input_key`` otherwise) and target with the module's own ``forward`` and its criterion
    attribute (looked up on each batch, so a criterion another technique reconfigured is the one attacked):

    * only input gradients are taken (``torch.autograd.grad``), the parameters' gradients are exactly those of
      ``clean loss + weight * adversarial loss``;
    * under DDP the attack runs on the unwrapped module, so DDP's reducer sees one forward/backward per step;
    * examples are generated in the model's current mode (training mode: dropout active, BatchNorm on batch
      statistics); BatchNorm running statistics are updated by the clean forward only;
    * under ``16-mixed`` the input gradients are taken with a loss scale (fp16 underflow), under ``bf16-mixed`` as is;
    * PGD's random start is drawn from a generator seeded by ``(seed, step, batch, rank)``: exact on resume.

    Args:
        method: ``"fgsm"`` (one step of size ``eps``) or ``"pgd"`` (``steps`` projected steps of size ``alpha``).
        eps: radius of the perturbation ball (L-inf: per element, in input units; L2: per example).
        alpha: PGD step size (default ``2.5 * eps / steps``).
        steps: PGD steps (>= 1; ignored by FGSM).
        weight: coefficient of the adversarial loss (>= 0; 0 switches the term off at no cost).
        norm: ``"linf"`` or ``"l2"``.
        random_start: PGD starts at a random point of the ball.
        input_range: ``[low, high]`` the adversarial inputs are clamped to (e.g. ``[0, 1]`` for images in [0, 1]),
            in the units ``training_step`` sees: after batch transforms such as :class:`ZScoreNormalization`.
        criterion_attr: the module's criterion attribute (default: its single loss-module attribute).
        input_key, target_key: where the input / target is in a dict or tuple batch (default: element 0 / 1, or the
            usual keys ``x``/``input``... and ``y``/``target``...).
        seed: base seed of PGD's random start.
        log: log ``adversarial/loss`` and ``adversarial/accuracy`` (on the adversarial examples) at the
            ``log_every_n_steps`` cadence (not passed: ``True``; ``False``: log nothing).
        log_values: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(callbacks=[AdversarialTraining("pgd", eps=0.1, steps=3, input_range=[0.0, 1.0])])

    Limits: automatic optimisation only; the module's ``forward`` must map the batch's input to what its criterion
    takes; each training step costs ``1 + steps`` extra forward/backward passes (FGSM: 1 + 1); inputs must be
    continuous (not token ids).
    """

    conflicts_with: tuple[str, ...] = ("AdversarialTraining",)  # two would register the same loss term
    term_name = "adversarial"

    def __init__(self, method: AttackMethod = "pgd", eps: float = 0.1, alpha: float | None = None, steps: int = 3,
                 weight: float = 1.0, norm: AttackNorm = "linf", random_start: bool = True,
                 input_range: list[float] | None = None, criterion_attr: str | None = None,
                 input_key: str | int | None = None, target_key: str | int | None = None, seed: int = 0,
                 log: bool | None = None, log_values: bool | None = None) -> None:
        log = resolve_log_flag("AdversarialTraining", log, log_values=log_values)
        check_choice("method", method, get_args(AttackMethod))
        check_positive("eps", eps)
        check_positive("steps", steps, integer=True)
        if alpha is not None:
            check_positive("alpha", alpha)
        _check_norm(norm)
        if not isinstance(random_start, bool):
            raise TypeError(f"random_start must be True or False, got {random_start!r}.")
        if criterion_attr is not None and not isinstance(criterion_attr, str):
            raise TypeError(f"criterion_attr must be None or an attribute name, got {criterion_attr!r}.")
        if target_key is not None and not isinstance(target_key, (str, int)):
            raise TypeError(f"target_key must be None, a key or an index, got {target_key!r}.")
        self._init_common(weight, input_range, input_key, seed, log)
        self.method = method
        self.eps = float(eps)
        self.steps = steps
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / steps
        self.norm = norm
        self.random_start = random_start
        self.criterion_attr = criterion_attr
        self.target_key = target_key
        self._criterion_name: str | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        self._criterion_name, _ = find_criterion(pl_module, self.criterion_attr)
        self._setup_term(trainer, pl_module)

    def attack(self, module: Any, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
               ) -> torch.Tensor:
        """The adversarial examples this callback trains on for input ``x`` and target ``y`` of ``module``."""
        criterion = getattr(module, self._criterion_name or find_criterion(module, self.criterion_attr)[0])
        if self.method == "fgsm":
            return fgsm(module, x, y, criterion, self.eps, norm=self.norm, input_range=self.input_range,
                        grad_scale=self._grad_scale)
        return pgd(module, x, y, criterion, self.eps, self.alpha, self.steps, self.random_start, self.norm,
                   input_range=self.input_range, generator=generator, grad_scale=self._grad_scale)

    def _term(self, module: nn.Module, batch: Any, batch_idx: int, loss: torch.Tensor) -> torch.Tensor:
        if self.weight == 0.0:
            return loss.new_zeros(())
        x, y = self._inputs(batch), get_targets(batch, self.target_key)
        generator = self._generator(module, batch_idx, x.device) if self.method == "pgd" else None
        x_adv = self.attack(module, x, y, generator)
        with preserved_batchnorm_stats(module):
            logits = module(x_adv)
        adv_loss = getattr(module, self._criterion_name or "criterion")(logits, y)
        if self._log_enabled:
            def metrics() -> dict[str, torch.Tensor]:
                values = {"adversarial/loss": adv_loss.detach()}
                if logits.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
                    values["adversarial/accuracy"] = (logits.detach().argmax(1) == y).float().mean()
                return values

            log_step_metrics(module, metrics)
        return self.weight * adv_loss


class VirtualAdversarialTraining(_AdversarialTerm):
    """Adds ``weight * KL(p(y|x) || p(y|x + r_adv))`` - virtual adversarial training's local distributional
    smoothness loss, which needs no labels - to the training loss.

    Miyato, Maeda, Koyama & Ishii, "Virtual Adversarial Training: A Regularization Method for Supervised and
    Semi-Supervised Learning", TPAMI 2018. ``r_adv`` (L2 norm ``eps`` per example) is found by ``power_iterations``
    steps of the power method from a random direction, with finite-difference step ``xi``; ``p(y|x)`` is held
    constant. Through the shared loss-term mechanism (accumulation, AMP scaling and DDP averaging apply). As for
    :class:`AdversarialTraining`: input gradients only, the unwrapped module's ``forward`` (DDP), the model's current
    mode, BatchNorm running statistics updated by the clean forward only, the random direction seeded by
    ``(seed, step, batch, rank)`` (exact on resume). The power iteration runs outside autocast in mixed precision.

    Args:
        xi: finite-difference step of the power iteration (paper: 1e-6).
        eps: L2 norm of the perturbation per example (scale with the input's size: the paper used 2.0 on MNIST's
            784 pixels and 8.0 on CIFAR-10's 3072 ZCA values).
        power_iterations: power-method steps (paper: 1 suffices).
        weight: coefficient ``alpha`` of the smoothness loss (>= 0; paper: 1).
        input_range: ``[low, high]`` the perturbed inputs are clamped to (in the units ``training_step`` sees).
        input_key: where the input is in a dict or tuple batch (default: element 0, or the usual keys).
        seed: base seed of the random start direction.
        log: log ``vat/loss`` at the ``log_every_n_steps`` cadence (not passed: ``True``; ``False``: log nothing).
        log_values: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        trainer = L.Trainer(callbacks=[VirtualAdversarialTraining(eps=1.0)])

    Limits: automatic optimisation only; ``forward`` must return logits over the last dimension; refused with
    ``16-true`` / ``bf16-true`` precision (half-precision inputs round the ``xi`` step away); each step costs about
    ``2 + power_iterations`` extra forwards.
    """

    conflicts_with: tuple[str, ...] = ("VirtualAdversarialTraining",)  # two would register the same loss term
    term_name = "vat"

    def __init__(self, xi: float = 1e-6, eps: float = 1.0, power_iterations: int = 1, weight: float = 1.0,
                 input_range: list[float] | None = None, input_key: str | int | None = None, seed: int = 0,
                 log: bool | None = None, log_values: bool | None = None) -> None:
        log = resolve_log_flag("VirtualAdversarialTraining", log, log_values=log_values)
        check_positive("xi", xi)
        check_positive("eps", eps)
        check_positive("power_iterations", power_iterations, integer=True)
        self._init_common(weight, input_range, input_key, seed, log)
        self.xi = float(xi)
        self.eps = float(eps)
        self.power_iterations = power_iterations

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision in ("16-true", "bf16-true"):
            raise ValueError(
                f"VirtualAdversarialTraining cannot run with Trainer(precision={precision!r}): half-precision inputs "
                f"round the power iteration's step xi={self.xi} away. Use '16-mixed' or 'bf16-mixed' instead."
            )
        self._setup_term(trainer, pl_module)

    def _term(self, module: nn.Module, batch: Any, batch_idx: int, loss: torch.Tensor) -> torch.Tensor:
        if self.weight == 0.0:
            return loss.new_zeros(())
        x = self._inputs(batch)
        value = vat_loss(module, x, self.xi, self.eps, self.power_iterations,
                         generator=self._generator(module, batch_idx, x.device), input_range=self.input_range,
                         grad_scale=self._grad_scale)
        if self._log_enabled:
            log_step_metrics(module, {"vat/loss": value.detach()})
        return self.weight * value
