"""LSUV: layer-sequential unit-variance initialisation (Mishkin & Matas, "All you need is a good init", ICLR 2016)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_techniques._internal import compat
from lightning_techniques._internal.artifacts import ArtifactLogger
from lightning_techniques._internal.batch import get_inputs
from lightning_techniques._internal.distributed import broadcast_module_, broadcast_object
from lightning_techniques._internal.lean_hooks import LeanHooks, needed_while
from lightning_techniques._internal.validation import check_number, check_positive, resolve_layer_type

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerReport:
    """Per-layer outcome of LSUV: output variance before/after scaling, iterations used, converged or not."""

    layer: str
    variance_before: float
    variance_after: float
    mean_after: float
    iterations: int
    converged: bool


class _Stop(Exception):
    """Raised from a forward hook to stop the forward pass once the layer of interest has run."""


def select_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of ``layer_types`` with a ``weight``, filtered by glob patterns on names."""
    chosen: list[tuple[str, nn.Module]] = []
    types: tuple[type[nn.Module], ...] = tuple(layer_types)
    for name, layer in model.named_modules():
        if not isinstance(layer, types) or not isinstance(getattr(layer, "weight", None), torch.Tensor):
            continue
        if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        chosen.append((name, layer))
    return chosen


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"layer output of type {type(output).__name__} has no tensor to measure")


def _capture(model: nn.Module, layer: nn.Module, forward: Callable[[], Any]) -> torch.Tensor | None:
    """Run ``forward`` until ``layer`` has produced its output; return that output (None if it never ran)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(_output_tensor(output).detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        forward()
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def forward_order(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], forward: Callable[[], Any]) -> list[str]:
    """Names of ``layers`` in the order a forward pass first calls them (layers never called are left out)."""
    order: list[str] = []
    handles = []
    for name, layer in layers:
        def hook(_m: nn.Module, _i: Any, _o: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(layer.register_forward_hook(hook))
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def lsuv_init(
    model: nn.Module,
    inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    tolerance: float = 0.1,
    max_iterations: int = 10,
    orthogonal: bool = True,
    center_bias: bool = False,
) -> list[LayerReport]:
    """LSUV-initialise ``model`` in place on a data batch and return a per-layer report.

    1. (``orthogonal``) pre-initialise every selected weight with an orthonormal matrix (``nn.init.orthogonal_``);
    2. for each selected layer, in forward order: run the batch forward to that layer, measure the variance of its
       output and divide the weight by its standard deviation, until ``|var - 1| < tolerance`` or
       ``max_iterations`` scalings (``center_bias``: also shift the bias so the output mean is 0, as fastai does).

    Args:
        model: the network (any ``nn.Module``); its train/eval mode is restored afterwards.
        inputs: what ``forward_fn`` is called with (default: ``model(inputs)``).
        forward_fn: ``forward_fn(model, inputs)`` for models whose forward needs more than one tensor.
        layer_types, include, exclude: which layers (types; glob patterns on qualified names).
        tolerance: accepted distance of the output variance from 1.
        max_iterations: cap on scalings per layer.
        orthogonal: do the orthonormal pre-initialisation.
        center_bias: additionally zero the output mean through the bias.

    Raises:
        ValueError: when no layer matches (the message lists the layers that exist).
    """
    check_positive("tolerance", tolerance)
    check_positive("max_iterations", max_iterations, integer=True)
    layers = select_layers(model, layer_types, include, exclude)
    if not layers:
        available = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n]
        raise ValueError(
            f"LSUV: no layer matches layer_types={[t.__name__ for t in layer_types]}, include={include}, "
            f"exclude={exclude}. Layers in the model: {available}"
        )

    def forward() -> Any:
        return forward_fn(model, inputs) if forward_fn is not None else model(inputs)

    was_training = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout off; batch-norm uses its (fresh) running statistics
    try:
        order = forward_order(model, layers, forward)
        by_name = dict(layers)
        never = [name for name, _ in layers if name not in order]
        if never:
            rank_zero_warn(f"LSUV: layers {never} are never called by the forward pass and are left as they are.")
        if orthogonal:
            for name in order:
                weight = cast(torch.Tensor, by_name[name].weight)  # _layers kept only layers with a tensor weight
                if weight.ndim >= 2:
                    nn.init.orthogonal_(weight)
        reports = []
        for name in order:
            layer = by_name[name]
            out = _capture(model, layer, forward)
            assert out is not None
            before = float(out.float().var())
            var, iterations = before, 0
            while abs(var - 1.0) >= tolerance and iterations < max_iterations:
                if not var > 0 or var != var:
                    break  # a dead (all-equal) or non-finite output cannot be scaled to unit variance
                if center_bias and getattr(layer, "bias", None) is not None:
                    channel_dim = 1 if out.ndim > 2 else -1
                    dims = [d for d in range(out.ndim) if d != channel_dim % out.ndim]
                    bias = cast(torch.Tensor, layer.bias)
                    bias.sub_(out.float().mean(dim=dims).to(bias.dtype))
                cast(torch.Tensor, layer.weight).div_(var**0.5)
                iterations += 1
                out = _capture(model, layer, forward)
                assert out is not None
                var = float(out.float().var())
            reports.append(
                LayerReport(name, before, var, float(out.float().mean()), iterations, abs(var - 1.0) < tolerance)
            )
        return reports
    finally:
        for module, training in was_training:
            module.training = training


class LSUVInit(LeanHooks, Callback):
    """Layer-sequential unit-variance initialisation of the user's model, on the first training batch.

    Mishkin & Matas, "All you need is a good init", ICLR 2016: orthonormal pre-initialisation, then, layer by layer
    in forward order, scale each Conv/Linear weight until its output variance on a real batch is 1.

    It runs once, on the first training batch of a fresh ``fit`` (so it sees exactly what ``training_step`` sees,
    including on-device batch transforms), before the first optimizer step. It never runs when ``fit`` resumes from
    a checkpoint. Under DDP rank 0 initialises on its batch and broadcasts the weights, so all ranks start
    identical. The per-layer report (variance before/after, iterations) is kept in ``self.report``, logged as a
    table artefact and printed.

    Args:
        tolerance: accepted ``|variance - 1|`` (paper: 0.1).
        max_iterations: cap on scalings per layer (paper: T_max = 10).
        layer_types: class paths or classes of the layers to initialise (default Linear and Conv1d/2d/3d).
        include: glob patterns on qualified layer names to restrict to (e.g. ``["net.*"]``).
        exclude: glob patterns of layers to skip (e.g. ``["head"]``).
        orthogonal: orthonormal pre-initialisation (paper: yes).
        center_bias: also zero each layer's output mean through its bias (fastai's variant).
        input_key: where the input is in a dict/tuple batch (default: element 0 or a known key such as ``"x"``).
        forward_fn: ``forward_fn(module, batch)`` for models whose forward is not ``module(inputs)``.

    Example::

        trainer = L.Trainer(callbacks=[LSUVInit()])
        trainer.fit(DeepMLP(depth=20), datamodule=DigitsDataModule())

    Limits: refuses FSDP/DeepSpeed (sharded weights); put it first in ``callbacks`` when another callback copies
    the weights at ``on_train_start`` (e.g. weight averaging).
    """

    takes_over: frozenset[str] = frozenset({"weights_init"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(
        self,
        tolerance: float = 0.1,
        max_iterations: int = 10,
        layer_types: Sequence[str | type[nn.Module]] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        orthogonal: bool = True,
        center_bias: bool = False,
        input_key: str | int | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        check_number("tolerance", tolerance, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_positive("max_iterations", max_iterations, integer=True)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}.")
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.layer_types = tuple(self._resolve_type(t) for t in (layer_types or DEFAULT_LAYER_TYPES))
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.orthogonal = orthogonal
        self.center_bias = center_bias
        self.input_key = input_key
        self.forward_fn = forward_fn
        self.done = False
        self.report: list[dict[str, Any]] = []

    @staticmethod
    def _resolve_type(spec: str | type[nn.Module]) -> type[nn.Module]:
        return resolve_layer_type(spec, "layer_types")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if compat.is_fsdp(trainer.strategy) or compat.is_deepspeed(trainer.strategy):
            raise ValueError(f"LSUVInit does not support {type(trainer.strategy).__name__} (sharded weights).")
        if stage == "fit" and not self.done and trainer.limit_train_batches == 0:
            raise ValueError("LSUVInit needs a training batch to initialise on, but limit_train_batches=0.")
        if stage == "fit" and not self.done:
            # misuse is reported before the first step: the layer selection must match something
            if not select_layers(pl_module, self.layer_types, self.include, self.exclude):
                available = [f"{n} ({type(m).__name__})" for n, m in pl_module.named_modules() if n]
                raise ValueError(
                    f"LSUVInit: no layer matches layer_types={[t.__name__ for t in self.layer_types]}, "
                    f"include={self.include}, exclude={self.exclude}. Layers in the model: {available}"
                )

    @needed_while(lambda self: not self.done)  # the first training batch of a fresh run only
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.done:
            return
        if trainer.ckpt_path is not None:
            # resuming: the weights come from the checkpoint, never re-initialised
            self.done = True
            return
        if trainer.is_global_zero:
            if self.forward_fn is not None:
                inputs: Any = batch
                forward_fn: Callable[[nn.Module, Any], Any] | None = self.forward_fn
            else:
                try:
                    inputs = get_inputs(batch, self.input_key)
                except (KeyError, IndexError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"LSUVInit needs a data batch with an input tensor: {err} Pass input_key=... or forward_fn=..."
                    ) from None
                forward_fn = None
            reports = lsuv_init(
                pl_module,
                inputs,
                forward_fn=forward_fn,
                layer_types=self.layer_types,
                include=self.include,
                exclude=self.exclude,
                tolerance=self.tolerance,
                max_iterations=self.max_iterations,
                orthogonal=self.orthogonal,
                center_bias=self.center_bias,
            )
            self.report = [asdict(r) for r in reports]
        self.report = broadcast_object(trainer.strategy, self.report)
        broadcast_module_(trainer.strategy, pl_module)
        self.done = True
        self._publish(trainer)

    def _publish(self, trainer: Any) -> None:
        if not trainer.is_global_zero or not self.report:
            return
        ArtifactLogger(trainer).log_table("lsuv/report", self.report, step=0)
        unconverged = [r["layer"] for r in self.report if not r["converged"]]
        lines = [f"  {r['layer']}: var {r['variance_before']:.3g} -> {r['variance_after']:.3f} ({r['iterations']} it)"
                 for r in self.report]
        rank_zero_info("LSUVInit: output variance per layer\n" + "\n".join(lines))
        if unconverged:
            rank_zero_warn(f"LSUVInit: layers {unconverged} did not reach unit variance within max_iterations.")

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", True))
        self.report = list(state_dict.get("report", []))
