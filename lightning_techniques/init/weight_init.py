"""Classical weight initialisation schemes per layer type / name pattern: Xavier/Glorot, He/Kaiming, orthogonal,
plain uniform / normal, zero; biases zeroed or constant.

Functional core :func:`init_weights` (plain PyTorch: the schemes are ``torch.nn.init``'s, fed by one seeded
generator) and the Lightning adapter :class:`WeightInit` (once at fit start, never on resume, rank 0 + broadcast).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_techniques._internal import compat
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.distributed import broadcast_module_, broadcast_object
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.validation import (
    check_choice,
    check_non_negative,
    check_number,
    check_positive,
    resolve_layer_type,
)

Scheme = Literal["xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform", "uniform", "normal",
                 "orthogonal", "zeros", "keep"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
FanMode = Literal["fan_in", "fan_out"]
Nonlinearity = Literal["relu", "leaky_relu", "tanh", "sigmoid", "linear", "selu"]

DEFAULT_INIT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_OPTION_KEYS = ("scheme", "mode", "nonlinearity", "negative_slope", "gain", "std", "bound", "bias")
_NEED_2D = ("xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform", "orthogonal")


@dataclass(frozen=True)
class InitSpec:
    """How one layer is initialised (see :func:`init_weights` for the meaning of each field)."""

    scheme: Scheme = "kaiming_normal"
    mode: FanMode = "fan_in"
    nonlinearity: Nonlinearity = "relu"
    negative_slope: float = 0.0
    gain: float = 1.0
    std: float = 0.02
    bound: float = 0.05
    bias: float | None = 0.0

    def __post_init__(self) -> None:
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("mode", self.mode, get_args(FanMode))
        check_choice("nonlinearity", self.nonlinearity, get_args(Nonlinearity))
        check_non_negative("negative_slope", self.negative_slope)
        check_positive("gain", self.gain)
        check_positive("std", self.std)
        check_positive("bound", self.bound)
        if self.bias is not None:
            check_number("bias", self.bias)

    def replace(self, options: str | Mapping[str, Any], where: str) -> InitSpec:
        """This spec with ``options`` (a scheme name, or a mapping of some fields) applied; errors name ``where``."""
        if isinstance(options, str):
            options = {"scheme": options}
        if not isinstance(options, Mapping):
            raise TypeError(f"{where}: expected a scheme name or a mapping of {list(_OPTION_KEYS)}, got {options!r}.")
        unknown = sorted(set(options) - set(_OPTION_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; allowed: {list(_OPTION_KEYS)}.")
        try:
            return InitSpec(**{**asdict(self), **dict(options)})
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None


@dataclass
class InitRecord:
    """What :func:`init_weights` did to one layer (``fan_in``/``fan_out`` as ``torch.nn.init`` computes them)."""

    layer: str
    type: str
    scheme: str
    fan_in: int
    fan_out: int
    weight_std: float
    bias: float | None


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight as ``torch.nn.init`` defines them (receptive field included)."""
    if weight.ndim < 2:
        return weight.numel(), weight.numel()
    receptive = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def expected_std(spec: InitSpec, weight: torch.Tensor) -> float:
    """The standard deviation the scheme's formula gives for ``weight`` (what the tests check the samples against).

    Xavier (Glorot & Bengio 2010): ``gain * sqrt(2 / (fan_in + fan_out))``; He (He et al. 2015):
    ``gain(nonlinearity) / sqrt(fan)`` (``sqrt(2 / fan_in)`` for ReLU); uniform ``U(-b, b)``: ``b / sqrt(3)``;
    orthogonal: ``gain / sqrt(max(rows, cols))`` for the flattened matrix; zeros: 0.
    """
    fan_in, fan_out = fans(weight)
    if spec.scheme in ("xavier_uniform", "xavier_normal"):
        return spec.gain * math.sqrt(2.0 / (fan_in + fan_out))
    if spec.scheme in ("kaiming_normal", "kaiming_uniform"):
        gain = nn.init.calculate_gain(spec.nonlinearity, spec.negative_slope if spec.nonlinearity == "leaky_relu"
                                      else None)
        return gain / math.sqrt(fan_in if spec.mode == "fan_in" else fan_out)
    if spec.scheme == "uniform":
        return spec.bound / math.sqrt(3.0)
    if spec.scheme == "normal":
        return spec.std
    if spec.scheme == "orthogonal":
        rows = weight.shape[0]
        cols = weight.numel() // rows
        return spec.gain / math.sqrt(max(rows, cols))
    if spec.scheme == "zeros":
        return 0.0
    raise ValueError(f"scheme={spec.scheme!r} has no formula (it keeps the weights).")


@torch.no_grad()
def init_layer_(layer: nn.Module, spec: InitSpec, generator: torch.Generator | None = None) -> None:
    """Initialise ``layer.weight`` (and ``layer.bias``) in place by ``spec`` with ``torch.nn.init``."""
    weight = cast(torch.Tensor, layer.weight)  # a layer with a tensor weight (nn.Module.__getattr__ is typed Tensor | Module)
    scheme = spec.scheme
    if scheme in _NEED_2D and weight.ndim < 2:
        raise ValueError(f"scheme={scheme!r} needs a weight with >= 2 dimensions (fan-in and fan-out); "
                         f"{type(layer).__name__} has shape {tuple(weight.shape)}.")
    if scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight, gain=spec.gain, generator=generator)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight, gain=spec.gain, generator=generator)
    elif scheme in ("kaiming_normal", "kaiming_uniform"):
        fn = nn.init.kaiming_normal_ if scheme == "kaiming_normal" else nn.init.kaiming_uniform_
        fn(weight, a=spec.negative_slope, mode=spec.mode, nonlinearity=spec.nonlinearity, generator=generator)
    elif scheme == "uniform":
        nn.init.uniform_(weight, -spec.bound, spec.bound, generator=generator)
    elif scheme == "normal":
        nn.init.normal_(weight, 0.0, spec.std, generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=spec.gain, generator=generator)
    elif scheme == "zeros":
        nn.init.zeros_(weight)
    bias = getattr(layer, "bias", None)
    if scheme != "keep" and spec.bias is not None and isinstance(bias, torch.Tensor):
        nn.init.constant_(bias, spec.bias)


def _resolve_type(spec: str | type[nn.Module], argument: str) -> type[nn.Module]:
    return resolve_layer_type(spec, argument)


def _describe_layers(model: nn.Module) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if n and isinstance(getattr(m, "weight", None), torch.Tensor)]


def plan_init(
    model: nn.Module,
    scheme: str | Mapping[str, Any] = "kaiming_normal",
    *,
    by_type: Mapping[str | type[nn.Module], str | Mapping[str, Any]] | None = None,
    by_name: Mapping[str, str | Mapping[str, Any]] | None = None,
    layer_types: Sequence[str | type[nn.Module]] | None = None,
    defaults: InitSpec | None = None,
) -> list[tuple[str, nn.Module, InitSpec]]:
    """Which layers get which :class:`InitSpec`, in registration order, checked before anything is changed.

    Precedence: the first ``by_name`` glob pattern matching the layer's qualified name, then ``by_type`` (the most
    derived class of the layer listed), then ``scheme``. Raises ``ValueError`` for a pattern or type that matches no
    layer (listing the layers that exist) and for two zero-initialised layers in a row (see :func:`init_weights`).
    """
    base = (defaults or InitSpec()).replace(scheme, "scheme")
    types = tuple(_resolve_type(t, "layer_types") for t in (layer_types or DEFAULT_INIT_TYPES))
    type_specs: dict[type[nn.Module], InitSpec] = {}
    for key, options in (by_type or {}).items():
        cls = _resolve_type(key, "by_type")
        type_specs[cls] = base.replace(options, f"by_type[{key!r}]")
    name_specs = [(pattern, base.replace(options, f"by_name[{pattern!r}]")) for pattern, options in (by_name or {}).items()]
    chosen_types = types + tuple(type_specs)
    plan: list[tuple[str, nn.Module, InitSpec]] = []
    used_patterns: set[str] = set()
    used_types: set[type[nn.Module]] = set()
    for name, layer in model.named_modules():
        if layer is model and not isinstance(layer, chosen_types):
            continue  # the root module (a LightningModule) is not a layer
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            continue
        spec = None
        for pattern, pattern_spec in name_specs:
            if fnmatch.fnmatchcase(name, pattern):
                spec = pattern_spec
                used_patterns.add(pattern)
                break
        if spec is None:
            if not isinstance(layer, chosen_types):
                continue
            for cls in type(layer).__mro__:
                if cls in type_specs:
                    spec = type_specs[cls]
                    used_types.add(cls)
                    break
        plan.append((name, layer, spec or base))
    unused = [p for p, _ in name_specs if p not in used_patterns]
    if unused:
        raise ValueError(f"by_name patterns {unused} match no layer with a weight. Layers in the model: "
                         f"{_describe_layers(model)}")
    unused_types = [c.__name__ for c in type_specs if c not in used_types and not any(
        isinstance(layer, c) for _, layer, _ in plan)]
    if unused_types:
        raise ValueError(f"by_type lists {unused_types}, but the model has no such layer. Layers in the model: "
                         f"{_describe_layers(model)}")
    if not plan:
        raise ValueError(f"no layer to initialise: layer_types={[t.__name__ for t in types]} match nothing. Layers "
                         f"in the model: {_describe_layers(model)}")
    for (name, layer, spec) in plan:
        weight = cast(torch.Tensor, layer.weight)  # planned layers have a tensor weight (nn.Module.__getattr__ is typed Tensor | Module)
        if spec.scheme in _NEED_2D and weight.ndim < 2:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}, weight {tuple(weight.shape)}): scheme "
                             f"{spec.scheme!r} needs a weight with >= 2 dimensions; use 'normal', 'uniform' or 'keep'.")
    _check_symmetry(plan)
    return plan


def _check_symmetry(plan: Sequence[tuple[str, nn.Module, InitSpec]]) -> None:
    """Refuse two zero-initialised layers in a row (registration order).

    A zero weight makes every unit of that layer compute the same value (its bias); if the next layer's weight is
    zero too, all those units also receive the same gradient, forever: the layer collapses to one unit (and with
    ReLU and zero biases nothing trains at all). One zero layer followed by a random one is fine - the classifier
    of a network, or the last layer of a residual branch (Goyal et al. 2017; Zhang, Dauphin & Ma 2019).
    """
    zeros = [name for name, _, spec in plan if spec.scheme == "zeros"]
    for (first, _, a), (second, _, b) in zip(plan, plan[1:]):
        if a.scheme == "zeros" and b.scheme == "zeros":
            raise ValueError(
                f"zero-initialising consecutive layers {first!r} and {second!r} (all zero layers: {zeros}) leaves "
                "their units symmetric: they compute the same value and get the same gradient forever, so the "
                "network cannot learn distinct features. Zero only the last layer (e.g. by_name={'head': 'zeros'}) "
                "or non-adjacent layers, and give the others a random scheme."
            )


def init_weights(
    model: nn.Module,
    scheme: str | Mapping[str, Any] = "kaiming_normal",
    *,
    by_type: Mapping[str | type[nn.Module], str | Mapping[str, Any]] | None = None,
    by_name: Mapping[str, str | Mapping[str, Any]] | None = None,
    layer_types: Sequence[str | type[nn.Module]] | None = None,
    mode: FanMode = "fan_in",
    nonlinearity: Nonlinearity = "relu",
    negative_slope: float = 0.0,
    gain: float = 1.0,
    std: float = 0.02,
    bound: float = 0.05,
    bias: float | None = 0.0,
    generator: torch.Generator | None = None,
) -> list[InitRecord]:
    """Initialise the weights (and biases) of ``model``'s layers in place; return what was done per layer.

    Schemes (``torch.nn.init``): ``"xavier_uniform"`` / ``"xavier_normal"`` (Glorot & Bengio 2010,
    ``Var = gain^2 * 2 / (fan_in + fan_out)``); ``"kaiming_normal"`` / ``"kaiming_uniform"`` (He, Zhang, Ren & Sun
    2015, ``Var = gain(nonlinearity)^2 / fan`` with ``fan`` = ``fan_in`` or ``fan_out`` (``mode``), e.g.
    ``2 / fan_in`` for ReLU, ``2 / ((1 + a^2) fan_in)`` for leaky ReLU of slope ``a``); ``"uniform"``
    (``U(-bound, bound)``); ``"normal"`` (``N(0, std^2)``); ``"orthogonal"`` (Saxe, McClelland & Ganguli 2014,
    scaled by ``gain``); ``"zeros"``; ``"keep"`` (leave the layer alone). Biases are set to the constant ``bias``
    (None keeps them).

    Args:
        model: any ``nn.Module``.
        scheme: the scheme of every selected layer not matched otherwise (a name, or a mapping of options).
        by_type: layer class (or its name / import path) -> scheme name or mapping of options, e.g.
            ``{"Conv2d": "kaiming_normal", "Linear": {"scheme": "xavier_uniform"}}``.
        by_name: glob pattern on qualified layer names -> scheme or options, e.g. ``{"head": "zeros"}``; wins over
            ``by_type``; may name any layer with a weight.
        layer_types: the layer types initialised by ``scheme`` (default Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d).
        mode, nonlinearity, negative_slope, gain, std, bound, bias: default options (per-layer mappings override).
        generator: the random generator of every draw (None: torch's global one).

    Raises:
        ValueError: a pattern / type matching no layer (the message lists the layers that exist), two zero layers
            in a row (symmetry), a fan-based scheme on a 1-D weight; nothing is changed then.
    """
    defaults = InitSpec(mode=mode, nonlinearity=nonlinearity, negative_slope=negative_slope, gain=gain, std=std,
                        bound=bound, bias=bias)
    plan = plan_init(model, scheme, by_type=by_type, by_name=by_name, layer_types=layer_types, defaults=defaults)
    records = []
    for name, layer, spec in plan:
        init_layer_(layer, spec, generator)
        weight = cast(torch.Tensor, layer.weight)  # planned layers have a tensor weight
        fan_in, fan_out = fans(weight)
        records.append(InitRecord(name, type(layer).__name__, spec.scheme, fan_in, fan_out,
                                  float(weight.detach().float().std()) if weight.numel() > 1 else 0.0,
                                  spec.bias if spec.scheme != "keep" else None))
    return records


class WeightInit(LeanHooks, Callback):
    """Initialise the model's layers once at the start of a fresh ``fit`` by a classical scheme per layer type or
    name pattern (Xavier/Glorot, He/Kaiming, orthogonal, uniform, normal, zero), biases zeroed or constant.

    Papers: Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks", AISTATS
    2010; He, Zhang, Ren & Sun, "Delving Deep into Rectifiers", ICCV 2015; Saxe, McClelland & Ganguli, "Exact
    solutions to the nonlinear dynamics of learning in deep linear neural networks", ICLR 2014. The schemes are
    ``torch.nn.init``'s (see :func:`init_weights` for the formulas), fed by one generator seeded with ``seed``.

    It runs in ``on_fit_start`` (the model is on its device, before the sanity check and the first step), never
    when ``fit`` resumes from a checkpoint (the weights come from it) and never twice. Under DDP rank 0 initialises
    and broadcasts every parameter and buffer, so all ranks start identical. The layer plan is checked in
    ``setup``, before anything runs: a ``by_name`` pattern or ``by_type`` entry matching no layer is an error that
    lists the layers, and so are two zero-initialised layers in a row (their units would stay symmetric). The
    per-layer record (scheme, fans, resulting std) is kept in ``self.report``.

    Args:
        scheme: scheme of every ``layer_types`` layer not matched by ``by_name`` / ``by_type``.
        by_type: layer type name / import path -> scheme name, or a mapping with ``scheme`` and options
            (``mode``, ``nonlinearity``, ``negative_slope``, ``gain``, ``std``, ``bound``, ``bias``).
        by_name: glob pattern on qualified layer names -> scheme or mapping, e.g. ``{"head": "zeros"}``.
        layer_types: types initialised by ``scheme`` (default Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d).
        mode: He's ``"fan_in"`` (forward variance) or ``"fan_out"`` (backward variance).
        nonlinearity: the activation after the layers (He's gain: relu sqrt(2), tanh 5/3, leaky_relu ...).
        negative_slope: leaky-ReLU slope ``a`` for ``nonlinearity="leaky_relu"``.
        gain: gain of the Xavier and orthogonal schemes.
        std: standard deviation of ``"normal"``.
        bound: ``U(-bound, bound)`` of ``"uniform"``.
        bias: constant for the biases (None keeps them).
        seed: seed of the draws (default: ``PL_GLOBAL_SEED`` set by ``seed_everything``, else 0); torch's global
            random state is not touched.

    Example::

        trainer = L.Trainer(callbacks=[WeightInit("kaiming_normal", by_name={"head": "zeros"})])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: refuses FSDP/DeepSpeed (sharded weights). :class:`LSUVInit` with ``orthogonal=False`` refines these
    weights on the first batch (it runs later); with ``orthogonal=True`` it overwrites them.
    """

    takes_over: frozenset[str] = frozenset({"weights_init"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ("WeightInit",)  # two would initialise the same layers

    def __init__(
        self,
        scheme: Scheme = "kaiming_normal",
        by_type: dict[str, Any] | None = None,
        by_name: dict[str, Any] | None = None,
        layer_types: list[str] | None = None,
        mode: FanMode = "fan_in",
        nonlinearity: Nonlinearity = "relu",
        negative_slope: float = 0.0,
        gain: float = 1.0,
        std: float = 0.02,
        bound: float = 0.05,
        bias: float | None = 0.0,
        seed: int | None = None,
    ) -> None:
        check_choice("scheme", scheme, SCHEMES)
        for argument, value in (("by_type", by_type), ("by_name", by_name)):
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{argument} must be a mapping (key -> scheme name or options), got {value!r}.")
        if seed is not None:
            check_number("seed", seed, low=0, integer=True)
        self.defaults = InitSpec(scheme=scheme, mode=mode, nonlinearity=nonlinearity, negative_slope=negative_slope,
                                 gain=gain, std=std, bound=bound, bias=bias)
        for key, options in (by_type or {}).items():
            _resolve_type(key, "by_type")
            self.defaults.replace(options, f"by_type[{key!r}]")
        for key, options in (by_name or {}).items():
            self.defaults.replace(options, f"by_name[{key!r}]")
        self.scheme = scheme
        self.by_type: dict[str | type[nn.Module], Any] | None = {k: v for k, v in by_type.items()} if by_type else None
        self.by_name = dict(by_name) if by_name else None
        self.layer_types = tuple(_resolve_type(t, "layer_types") for t in (layer_types or DEFAULT_INIT_TYPES))
        self.mode = mode
        self.nonlinearity = nonlinearity
        self.negative_slope = negative_slope
        self.gain = gain
        self.std = std
        self.bound = bound
        self.bias = bias
        self.seed = seed
        self.done = False
        self.report: list[dict[str, Any]] = []

    def _plan(self, model: nn.Module) -> list[tuple[str, nn.Module, InitSpec]]:
        return plan_init(model, self.scheme, by_type=self.by_type, by_name=self.by_name,
                         layer_types=self.layer_types, defaults=self.defaults)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        if compat.shards_parameters(trainer.strategy):
            raise ValueError(f"WeightInit does not support {type(trainer.strategy).__name__} (sharded weights).")
        if not self.done and trainer.ckpt_path is None:
            self._plan(pl_module)  # misuse reported before anything runs

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.done:
            return
        self.done = True
        if trainer.ckpt_path is not None:
            return  # resuming: the weights come from the checkpoint
        if trainer.is_global_zero:
            device = next(iter(pl_module.parameters()), torch.empty(0)).device
            generator = torch.Generator(device=device).manual_seed(
                self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0)))
            records = init_weights(
                pl_module, self.scheme, by_type=self.by_type, by_name=self.by_name, layer_types=self.layer_types,
                mode=self.mode, nonlinearity=self.nonlinearity, negative_slope=self.negative_slope, gain=self.gain,
                std=self.std, bound=self.bound, bias=self.bias, generator=generator,
            )
            self.report = [asdict(r) for r in records]
        self.report = broadcast_object(trainer.strategy, self.report)
        broadcast_module_(trainer.strategy, pl_module)
        counts: dict[str, int] = {}
        for record in self.report:
            counts[record["scheme"]] = counts.get(record["scheme"], 0) + 1
        rank_zero_info(f"WeightInit: initialised {len(self.report)} layers ({counts}).")

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", True))
        self.report = list(state_dict.get("report", []))
