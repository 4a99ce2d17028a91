"""Any common optimizer by name, without editing ``configure_optimizers``; no weight decay on biases and norm weights.

Functional core (plain torch): :func:`decay_param_groups`, :func:`build_optimizer`, :class:`CombinedOptimizer`,
:class:`DistributedLBFGS`, :func:`asgd_averages`. Lightning adapter: :class:`OptimizerCallback`.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_techniques._internal import compat
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.distributed import all_reduce_sum, is_distributed
from lightning_techniques._internal.lean_hooks import LeanHooks, needed_while
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_positive
from lightning_techniques.optim._configure import register_optimizer_provider, unregister

OptimizerName = Literal["adam", "adamw", "amsgrad", "sgd", "nesterov", "rmsprop", "adagrad", "adadelta", "nadam",
                        "radam", "lbfgs", "rprop", "sparse_adam", "asgd"]
#: the optimizers for the dense parameters next to SparseAdam (not sparse_adam itself, not lbfgs)
DenseOptimizerName = Literal["adam", "adamw", "amsgrad", "sgd", "nesterov", "rmsprop", "adagrad", "adadelta", "nadam",
                             "radam", "rprop", "asgd"]
#: name -> (optimizer class, default keyword arguments that differ from torch's)
OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "amsgrad": (torch.optim.AdamW, {"amsgrad": True}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
    "lbfgs": (torch.optim.LBFGS, {}),
    "rprop": (torch.optim.Rprop, {}),
    "sparse_adam": (torch.optim.SparseAdam, {}),
    "asgd": (torch.optim.ASGD, {}),
}

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _accepted_kwargs(cls: type[Optimizer]) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")}


def supports_weight_decay(name: str) -> bool:
    """Whether the optimizer registered as ``name`` has a ``weight_decay`` argument (L-BFGS, Rprop, SparseAdam do not)."""
    return "weight_decay" in _accepted_kwargs(OPTIMIZERS[name][0])


def no_decay_parameter_names(model: nn.Module, no_decay: Iterable[str] = ()) -> set[str]:
    """Names of the parameters that get no weight decay: biases and every other parameter with fewer than 2
    dimensions, all parameters of normalisation layers, and those matching the glob patterns ``no_decay``."""
    names: set[str] = set()
    patterns = list(no_decay)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                param.ndim < 2
                or isinstance(module, NORM_LAYERS)
                or any(fnmatch.fnmatchcase(full, pattern) for pattern in patterns)
            ):
                names.add(full)
    return names


def decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Iterable[str] = (),
    decay_norm_and_bias: bool = False,
    params: Iterable[tuple[str, Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups ``[{"name": "decay", ...}, {"name": "no_decay", "weight_decay": 0.0, ...}]``.

    Only trainable parameters (``requires_grad``) are included; ``params`` restricts to given ``(name, param)``
    pairs. With ``weight_decay == 0`` (or ``decay_norm_and_bias``) a single group named ``"params"`` is returned.
    Empty groups are left out.
    """
    named = [(n, p) for n, p in (model.named_parameters() if params is None else params) if p.requires_grad]
    if weight_decay == 0 or decay_norm_and_bias:
        return [{"name": "params", "params": [p for _, p in named], "weight_decay": weight_decay}] if named else []
    excluded = no_decay_parameter_names(model, no_decay)
    decay = [p for n, p in named if n not in excluded]
    keep = [p for n, p in named if n in excluded]
    groups = []
    if decay:
        groups.append({"name": "decay", "params": decay, "weight_decay": weight_decay})
    if keep:
        groups.append({"name": "no_decay", "params": keep, "weight_decay": 0.0})
    return groups


def sparse_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that receive sparse gradients: weights of ``nn.Embedding``/``nn.EmbeddingBag``
    built with ``sparse=True``."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


class CombinedOptimizer(Optimizer):
    """Several optimizers over disjoint parameters acting as one (one ``step``, one ``zero_grad``, one state dict).

    Lightning's automatic optimisation drives exactly one optimizer; this lets SparseAdam (sparse embedding
    gradients) and a dense optimizer (everything else) be that one. ``param_groups`` are the children's own group
    dicts, so an LR scheduler on the combination changes the children's LRs. ``step(closure)`` evaluates the closure
    once, then steps every child (so closure-driven optimizers such as L-BFGS cannot be children).

    Source: none needed - the bookkeeping that ``torch.optim.SparseAdam``'s documentation asks users to do by hand
    ("use SparseAdam for the sparse embedding and another optimizer for the rest").

    Args:
        optimizers: the optimizers to combine (disjoint parameters).

    Example::

        opt = CombinedOptimizer([torch.optim.SparseAdam(emb.parameters()), torch.optim.AdamW(head.parameters())])

    Limits: no L-BFGS child; ``state`` is a merged read-only view (each child owns its state).
    """

    def __init__(self, optimizers: list[Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer.")
        if any(isinstance(o, torch.optim.LBFGS) for o in optimizers):
            raise ValueError("CombinedOptimizer cannot hold L-BFGS: it must evaluate the closure itself.")
        self.optimizers = list(optimizers)
        super().__init__([{"params": list(g["params"])} for o in self.optimizers for g in o.param_groups], {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, Any]:
        merged: dict[Tensor, Any] = {}
        for optimizer in self.optimizers:
            merged.update(optimizer.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns an empty state; the children own theirs
        pass

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(
                f"CombinedOptimizer: the state holds {len(states) if isinstance(states, list) else 'no'} optimizer "
                f"states, this combination has {len(self.optimizers)}."
            )
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
        # the children now hold new group dicts; relink in place (wrappers may hold this very list)
        self.param_groups[:] = [g for o in self.optimizers for g in o.param_groups]

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


class DistributedLBFGS(torch.optim.LBFGS):
    """``torch.optim.LBFGS`` whose closure loss is averaged over ranks before L-BFGS looks at it.

    L-BFGS decides how many times it re-evaluates the closure from the loss (``tolerance_change``, line search);
    under DDP the gradients are already averaged but each rank's loss is its own, so ranks could take a different
    number of closure calls and hang in the next gradient all-reduce. ``loss_reducer`` (e.g. a mean over ranks)
    makes every rank see the same loss. Without one it is plain L-BFGS (Liu & Nocedal, 1989).

    Args:
        params: parameters (one group; L-BFGS supports no others).
        loss_reducer: ``loss -> agreed loss`` applied to every closure result.
        **kwargs: ``torch.optim.LBFGS`` arguments (``lr``, ``max_iter``, ``history_size``, ``line_search_fn`` ...).

    Example::

        opt = DistributedLBFGS(model.parameters(), loss_reducer=lambda l: all_reduce_sum(strategy, l) / 2)

    Limits: as ``torch.optim.LBFGS``: one parameter group, a closure is required.
    """

    def __init__(self, params: Any, loss_reducer: Callable[[Tensor], Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.loss_reducer = loss_reducer

    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        if self.loss_reducer is None or closure is None:
            return super().step(closure)
        reducer = self.loss_reducer

        def agreed() -> Any:
            loss = closure()
            return loss if loss is None else reducer(torch.as_tensor(loss).detach())

        return super().step(agreed)


def build_optimizer(
    model: nn.Module,
    name: OptimizerName = "adamw",
    lr: float | None = None,
    weight_decay: float = 0.0,
    no_decay: Iterable[str] = (),
    decay_norm_and_bias: bool = False,
    dense_optimizer: DenseOptimizerName = "adamw",
    loss_reducer: Callable[[Tensor], Tensor] | None = None,
    **kwargs: Any,
) -> Optimizer:
    """Build the optimizer registered as ``name`` (see :data:`OPTIMIZERS`) over ``model``'s trainable parameters.

    Weight decay goes only to the ``"decay"`` group (see :func:`decay_param_groups`). ``lr=None`` keeps torch's
    default for that optimizer; ``kwargs`` go to the optimizer class. ``"lbfgs"`` gets one parameter group (L-BFGS
    supports no others) and ``loss_reducer`` (see :class:`DistributedLBFGS`). ``"sparse_adam"`` puts the sparse
    embedding weights (:func:`sparse_parameter_names`) under SparseAdam and the rest under ``dense_optimizer``
    (same ``lr``, ``weight_decay`` groups), combined in a :class:`CombinedOptimizer`.
    """
    check_choice("name", name, list(OPTIMIZERS))
    cls, defaults = OPTIMIZERS[name]
    options = {**defaults, **kwargs}
    if lr is not None:
        options["lr"] = lr
    unknown = set(options) - _accepted_kwargs(cls)
    if unknown:
        raise ValueError(f"optimizer_kwargs {sorted(unknown)} are not arguments of {cls.__name__}; "
                         f"allowed: {sorted(_accepted_kwargs(cls) - {'lr'})}.")
    if "weight_decay" in kwargs:
        raise ValueError("give weight_decay as its own argument, not inside the optimizer's keyword arguments.")
    if weight_decay and not supports_weight_decay(name) and name != "sparse_adam":
        raise ValueError(f"weight_decay={weight_decay}: {cls.__name__} has no weight decay; use 0.")
    if name == "lbfgs":
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("build_optimizer: the model has no trainable parameters.")
        return DistributedLBFGS(params, loss_reducer=loss_reducer, **options)
    if name == "sparse_adam":
        check_choice("dense_optimizer", dense_optimizer, [n for n in OPTIMIZERS if n not in ("sparse_adam", "lbfgs")])
        sparse = sparse_parameter_names(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sparse_params = [p for n, p in named if n in sparse]
        if not sparse_params:
            raise ValueError(
                "sparse_adam needs parameters with sparse gradients (nn.Embedding(..., sparse=True) or "
                "nn.EmbeddingBag(..., sparse=True)); the model has none. Use 'adam'/'adamw' for dense models."
            )
        sparse_opt = torch.optim.SparseAdam([{"name": "sparse", "params": sparse_params}], **options)
        dense_named = [(n, p) for n, p in named if n not in sparse]
        if not dense_named:
            return sparse_opt
        dense_cls, dense_options = OPTIMIZERS[dense_optimizer]
        dense_options = dict(dense_options)
        if lr is not None:
            dense_options["lr"] = lr
        groups = decay_param_groups(model, weight_decay, no_decay, decay_norm_and_bias, params=dense_named)
        if "weight_decay" in _accepted_kwargs(dense_cls):
            dense_options["weight_decay"] = weight_decay
        else:
            groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups]
        dense = dense_cls(groups, **dense_options)
        return CombinedOptimizer([sparse_opt, dense])
    groups = decay_param_groups(model, weight_decay, no_decay, decay_norm_and_bias)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters.")
    if "weight_decay" in _accepted_kwargs(cls):
        options["weight_decay"] = weight_decay  # AdamW's own default of 0.01 must not apply
    else:
        groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups]
    return cls(groups, **options)


def asgd_averages(optimizer: Optimizer) -> dict[Tensor, Tensor]:
    """``{parameter: averaged value}`` from an ASGD optimizer's state (``state[p]["ax"]``; empty before a step)."""
    return {p: s["ax"] for p, s in optimizer.state.items() if isinstance(s, dict) and "ax" in s}


_LBFGS_CONFLICTS: tuple[str, ...] = (
    "OptimizerCallback",
    "AccumulationScheduler",
    "GradientAccumulationScheduler",
    "AdaptiveGradientClipping",
    "AutoClip",
)


class OptimizerCallback(LeanHooks, Callback):
    """Gives an unmodified LightningModule any common optimizer, chosen by name, without weight decay on biases and
    normalisation weights.

    The module's own ``configure_optimizers`` is replaced (on this instance, for this run) by one that builds
    ``name``; an LR-schedule callback (:class:`~lightning_techniques.optim.schedules.LRSchedule`,
    :class:`~lightning_techniques.optim.schedules.ReduceLROnPlateau`) wraps it in any order in ``callbacks``.
    Optimizer state is saved in checkpoints and restored on resume by Lightning.

    Methods: Adam (Kingma & Ba, 2015), AdamW (Loshchilov & Hutter, 2019), AMSGrad (Reddi, Kale & Kumar, 2018; AdamW
    with ``amsgrad=True``), SGD with momentum (Polyak, 1964) / Nesterov (Sutskever et al., 2013), RMSprop (Tieleman &
    Hinton, 2012), Adagrad (Duchi, Hazan & Singer, 2011), Adadelta (Zeiler, 2012), NAdam (Dozat, 2016), RAdam (Liu et
    al., 2020), L-BFGS (Liu & Nocedal, 1989), Rprop (Riedmiller & Braun, 1993), SparseAdam, ASGD (Polyak & Juditsky,
    1992). The "no decay on biases and norm weights" grouping follows Loshchilov & Hutter (2019) / BERT practice.

    The hard ones:

    * ``"lbfgs"``: Lightning passes its closure (training_step + backward) to ``optimizer.step``; L-BFGS calls it up
      to ``max_iter`` times per step, so ``training_step`` and its ``self.log`` calls run several times per
      optimizer step (``on_step`` values are those of the last evaluation; ``on_epoch`` means average over every
      evaluation). Refused: ``accumulate_grad_batches > 1`` (checked in ``setup`` and before every batch, so a
      scheduled accumulation is caught) and ``16-mixed`` (GradScaler cannot drive a closure). Under DDP the closure
      loss is averaged over ranks (:class:`DistributedLBFGS`) so all ranks take the same number of evaluations.
    * ``"sparse_adam"``: SparseAdam for ``nn.Embedding(sparse=True)``/``EmbeddingBag(sparse=True)`` weights,
      ``dense_optimizer`` for the rest, as one :class:`CombinedOptimizer`; refused (in ``setup``) when the model has
      no sparse embedding.
    * ``"asgd"``: validation and test run with the averaged parameters (``state[p]["ax"]``), training continues from
      the raw ones; saved checkpoints hold the averaged weights as the model's ``state_dict`` (so
      ``load_from_checkpoint`` gives the averaged model) and the raw ones in this callback's state (so ``fit``
      resumes exactly); after ``fit`` the model holds the averaged weights. Note torch's ``t0`` default (1e6):
      averaging starts after ``t0`` steps, set ``optimizer_kwargs={"t0": ...}``.

    Args:
        name: one of ``adam, adamw, amsgrad, sgd, nesterov, rmsprop, adagrad, adadelta, nadam, radam, lbfgs, rprop,
            sparse_adam, asgd``. ``sgd`` has momentum 0.9 by default, ``nesterov`` is SGD with Nesterov momentum 0.9.
        lr: learning rate (``None``: torch's default for that optimizer, e.g. 1.0 for Adadelta and L-BFGS).
        weight_decay: weight decay of the ``"decay"`` group (must be 0 for L-BFGS and Rprop; with ``sparse_adam`` it
            applies to the dense parameters only).
        no_decay: extra glob patterns of parameter names to exclude from weight decay (e.g. ``["pos", "*.embed*"]``).
        decay_norm_and_bias: apply weight decay to every parameter (turn the exclusion off).
        optimizer_kwargs: further arguments of the optimizer class (``betas``, ``momentum``, ``max_iter``, ``t0`` ...).
        dense_optimizer: for ``sparse_adam``, the optimizer of the dense parameters.
        asgd_eval_averaged: for ``asgd``, evaluate/checkpoint/finish with the averaged parameters (default True).

    Example::

        trainer = L.Trainer(callbacks=[OptimizerCallback("adamw", lr=3e-3, weight_decay=0.05)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: one optimizer (automatic optimisation); while attached, the module's own ``configure_optimizers`` is
    not called at all (its optimizer and any scheduler it returns are dropped: add schedules with
    :class:`~lightning_techniques.optim.schedules.LRSchedule`); FSDP/DeepSpeed (which build optimizers themselves)
    are not supported; ``16-mixed`` AMP with L-BFGS is refused. Refused in ``setup``: a second
    ``OptimizerCallback``; with ``"lbfgs"`` also any gradient accumulation (``AccumulationScheduler``, Lightning's
    ``GradientAccumulationScheduler``, ``accumulate_grad_batches > 1``) and gradient clipping
    (``AdaptiveGradientClipping``, ``AutoClip``, ``Trainer(gradient_clip_val=...)``), which would run inside every
    closure evaluation of L-BFGS's line search.
    """

    takes_over: frozenset[str] = frozenset({"configure_optimizers"})
    conflicts_with: tuple[str, ...] = ("OptimizerCallback",)

    def __init__(
        self,
        name: OptimizerName = "adamw",
        lr: float | None = None,
        weight_decay: float = 0.0,
        no_decay: list[str] | None = None,
        decay_norm_and_bias: bool = False,
        optimizer_kwargs: dict[str, Any] | None = None,
        dense_optimizer: DenseOptimizerName = "adamw",
        asgd_eval_averaged: bool = True,
    ) -> None:
        check_choice("name", name, list(OPTIMIZERS))
        if lr is not None:
            check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_choice("dense_optimizer", dense_optimizer, [n for n in OPTIMIZERS if n not in ("sparse_adam", "lbfgs")])
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
            raise TypeError(f"optimizer_kwargs must be a dict, got {type(optimizer_kwargs).__name__}.")
        if no_decay is not None and (isinstance(no_decay, str) or not all(isinstance(p, str) for p in no_decay)):
            raise TypeError(f"no_decay must be a list of glob patterns (strings), got {no_decay!r}.")
        cls = OPTIMIZERS[name][0]
        kwargs = dict(optimizer_kwargs or {})
        for reserved in ("lr", "weight_decay", "params"):
            if reserved in kwargs:
                raise ValueError(f"optimizer_kwargs must not contain {reserved!r}; use the {reserved} argument.")
        unknown = set(kwargs) - _accepted_kwargs(cls)
        if unknown:
            raise ValueError(
                f"optimizer_kwargs {sorted(unknown)} are not arguments of {cls.__name__} (name={name!r}); "
                f"allowed: {sorted(_accepted_kwargs(cls) - {'lr', 'weight_decay'})}."
            )
        if weight_decay and not supports_weight_decay(name) and name != "sparse_adam":
            raise ValueError(f"weight_decay={weight_decay}: {cls.__name__} (name={name!r}) has no weight decay; use 0.")
        self.name = name
        self.lr = lr
        self.weight_decay = weight_decay
        self.no_decay = list(no_decay) if no_decay else []
        self.decay_norm_and_bias = decay_norm_and_bias
        self.optimizer_kwargs = kwargs
        self.dense_optimizer = dense_optimizer
        self.asgd_eval_averaged = asgd_eval_averaged
        self._module: nn.Module | None = None
        self._raw: dict[str, Tensor] | None = None  # raw ASGD weights while the averaged ones are in the model
        if name == "lbfgs":  # this instance refuses more than the class does (see Limits)
            self.takes_over = frozenset({"configure_optimizers", "optimizer_step"})
            self.conflicts_with = _LBFGS_CONFLICTS
            self.conflict_reasons = dict.fromkeys(
                ("AccumulationScheduler", "GradientAccumulationScheduler"),
                "L-BFGS re-evaluates the loss of ONE batch in its closure and cannot accumulate gradients over several",
            ) | dict.fromkeys(
                ("AdaptiveGradientClipping", "AutoClip"),
                "clipping would run inside every closure evaluation of L-BFGS's line search and corrupt its curvature "
                "estimate",
            )
        elif self._averaging:
            self.takes_over = frozenset({"configure_optimizers", "eval_hooks"})

    def conflict_label(self) -> str:
        return f"OptimizerCallback(name={self.name!r})"

    # ------------------------------------------------------------------ set-up
    def _check_lbfgs(self, trainer: Any) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"OptimizerCallback(name='lbfgs') cannot accumulate gradients (accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): L-BFGS re-evaluates the loss of ONE batch in its closure. "
                "Use a larger batch instead."
            )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        if compat.is_fsdp(trainer.strategy) or compat.is_deepspeed(trainer.strategy):
            raise ValueError(f"OptimizerCallback does not support {type(trainer.strategy).__name__} "
                             "(it builds the optimizer itself).")
        if self.name == "lbfgs":
            self._check_lbfgs(trainer)
            clip = getattr(trainer, "gradient_clip_val", None)
            if clip is not None and clip > 0:
                raise ValueError(
                    f"OptimizerCallback(name='lbfgs') cannot be used with Trainer(gradient_clip_val={clip}): "
                    "clipping would run inside every closure evaluation of L-BFGS's line search. Remove it."
                )
            if str(trainer.precision) in ("16-mixed", "16"):
                raise ValueError(
                    f"OptimizerCallback(name='lbfgs') cannot run under precision={trainer.precision!r}: the AMP "
                    "GradScaler cannot drive L-BFGS's closure. Use '32-true' or 'bf16-mixed'."
                )
            if not pl_module.automatic_optimization:
                rank_zero_warn("OptimizerCallback(name='lbfgs') with manual optimisation: pass a closure to "
                               "optimizer.step(closure) yourself.")
        if self.name == "sparse_adam" and not sparse_parameter_names(pl_module):
            embeddings = [n for n, m in pl_module.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
            raise ValueError(
                "OptimizerCallback(name='sparse_adam') needs nn.Embedding/EmbeddingBag layers built with sparse=True; "
                f"the module has none (embedding layers found: {embeddings or 'none'}). Use 'adam'/'adamw' instead."
            )
        self._module = pl_module
        register_optimizer_provider(pl_module, self, self._build)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            unregister(pl_module, self)  # after a failed fit the composition's own clean-up does it

    def _build(self, module: nn.Module) -> Optimizer:
        reducer = None
        trainer = compat.trainer_of(module)
        if self.name == "lbfgs" and trainer is not None and is_distributed(trainer.strategy):
            strategy = trainer.strategy

            def reducer(loss: Tensor) -> Tensor:
                return all_reduce_sum(strategy, loss.float()) / strategy.world_size

        return build_optimizer(
            module,
            self.name,
            lr=self.lr,
            weight_decay=self.weight_decay,
            no_decay=self.no_decay,
            decay_norm_and_bias=self.decay_norm_and_bias,
            dense_optimizer=self.dense_optimizer,
            loss_reducer=reducer,
            **self.optimizer_kwargs,
        )

    @needed_while(lambda self: self.name == "lbfgs")
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.name == "lbfgs":
            self._check_lbfgs(trainer)  # an accumulation scheduler may have changed it since setup

    # ------------------------------------------------------------------ ASGD averaged parameters
    @property
    def _averaging(self) -> bool:
        return self.asgd_eval_averaged and (
            self.name == "asgd" or (self.name == "sparse_adam" and self.dense_optimizer == "asgd")
        )

    def _averages_by_name(self, trainer: Any, pl_module: nn.Module) -> dict[str, Tensor]:
        if not trainer.optimizers:
            return {}
        averages = asgd_averages(trainer.optimizers[0])
        return {n: averages[p] for n, p in pl_module.named_parameters() if p in averages}

    @torch.no_grad()
    def _swap_in(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self._averaging or self._raw is not None:
            return
        averages = self._averages_by_name(trainer, pl_module)
        if not averages:
            return
        params = dict(pl_module.named_parameters())
        self._raw = {n: params[n].detach().clone() for n in averages}
        for n, value in averages.items():
            params[n].copy_(value)

    @torch.no_grad()
    def _swap_out(self, pl_module: nn.Module) -> None:
        if self._raw is None:
            return
        params = dict(pl_module.named_parameters())
        for n, value in self._raw.items():
            params[n].copy_(value)
        self._raw = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out(pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self._swap_out(pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if not self._averaging:
            return
        averages = self._averages_by_name(trainer, pl_module)
        if not averages:
            return
        params = dict(pl_module.named_parameters())
        raw = self._raw if self._raw is not None else {n: params[n].detach().clone() for n in averages}
        state_dict = checkpoint["state_dict"]
        for n, value in averages.items():
            if n in state_dict:
                state_dict[n] = value.detach().clone()
        checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})["asgd_raw_weights"] = {
            n: v.detach().cpu().clone() for n, v in raw.items()
        }

    @torch.no_grad()
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        raw = (checkpoint.get("callbacks", {}).get(self.state_key) or {}).get("asgd_raw_weights")
        if not raw or trainer.state.fn != "fit":
            return
        params = dict(pl_module.named_parameters())
        for n, value in raw.items():
            params[n].copy_(value.to(params[n].device))
        self._raw = None

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "averaged_in_model": self._raw is not None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._raw = None  # the raw weights are put back by on_load_checkpoint
