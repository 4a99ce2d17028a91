"""What the peft-based methods share: injecting a peft tuner into exactly the chosen layers of any ``nn.Module``,
finding the tuner layers and their adapter parameters, merging them into the base layers, and adapter-only state.

Targets by name / regular expression / layer type, freezing for the run with ``requires_grad`` given back, and
frozen parameters kept out of the optimizer are in :mod:`lightning_techniques.finetune._trainable` (one copy for
every fine-tuning method of the package); this module adds the peft-specific part on top.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_techniques._internal.optional import require

#: The adapter name peft gives the one adapter these callbacks insert.
ADAPTER = "default"


def peft_module(feature: str) -> Any:
    """``import peft`` or an ``ImportError`` naming the ``finetune`` extra."""
    return require("peft", "finetune", feature)


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft tuner layer (a LoRA / IA3 / LoHa / LoKr wrapper of a base layer)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - without peft nothing is a tuner layer
        return False
    return isinstance(module, BaseTunerLayer)


def tuner_layers(model: nn.Module) -> dict[str, Any]:
    """The peft tuner layers of ``model`` by ``named_modules()`` path (outermost only)."""
    found: dict[str, Any] = {}
    for path, module in model.named_modules():
        if path and is_tuner_layer(module) and not any(path.startswith(p + ".") for p in found):
            found[path] = module
    return found


def outside_tuner_layers(model: nn.Module) -> nn.Module:
    """Paths inside a tuner layer (``head.base_layer``, ``head.lora_A.default``) are the tuner's own: a view of
    ``model`` for target resolution that hides them, so a layer type or a regular expression never selects them."""

    class _View(nn.Module):
        def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True) -> Any:
            inside: list[str] = []
            for path, module in model.named_modules():
                if any(path.startswith(p + ".") for p in inside):
                    continue
                if path and is_tuner_layer(module):
                    inside.append(path)
                yield path, module

        def get_submodule(self, target: str) -> nn.Module:
            return model.get_submodule(target)

    return _View()


def exact_paths_regex(paths: Sequence[str]) -> str:
    """A regular expression peft matches in full against module paths that selects exactly ``paths``."""
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def inject(model: nn.Module, config: Any, paths: Sequence[str]) -> None:
    """Inject the peft tuner of ``config`` into exactly the layers at ``paths`` (``peft.inject_adapter_in_model``
    with ``target_modules`` set to those paths), leaving nothing else on the model: the ``peft_config`` attribute
    peft sets on the root is removed again. (peft also freezes every non-adapter parameter: the callers take a
    ``requires_grad`` snapshot before and give it back at the end.)"""
    peft = peft_module("LoRA")
    had_config = "peft_config" in vars(model)
    config.target_modules = exact_paths_regex(paths)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if not had_config:
        vars(model).pop("peft_config", None)


def adapter_parameter_names(model: nn.Module, paths: Sequence[str] | None = None) -> list[str]:
    """The ``named_parameters()`` names of the adapter weights of the tuner layers at ``paths`` (all when None):
    the parameters under the layer's ``adapter_layer_names`` (``lora_A``, ``lora_B``, ``lora_magnitude_vector``,
    ``ia3_l``, ``hada_*``, ``lokr_*``), never the base layer's."""
    layers = tuner_layers(model)
    names = []
    for path, layer in layers.items():
        if paths is not None and path not in paths:
            continue
        adapter_names = set(getattr(layer, "adapter_layer_names", ()))
        for name, _ in layer.named_parameters():
            if set(name.split(".")) & adapter_names:
                names.append(f"{path}.{name}")
    return names


def adapter_state_dict(model: nn.Module, paths: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Only the adapter weights of ``model`` (keys as in ``model.state_dict()``), detached copies on the CPU."""
    wanted = set(adapter_parameter_names(model, paths))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in wanted}


def merge_and_unload(model: nn.Module, paths: Sequence[str] | None = None) -> list[str]:
    """Merge the adapters of the tuner layers at ``paths`` (all when None) into their base weights and put the base
    layers back in their place: the module has its original classes and ``state_dict`` keys again, with the
    adapted weights. Returns the merged paths."""
    merged = []
    for path, layer in tuner_layers(model).items():
        if paths is not None and path not in paths:
            continue
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, base)
        merged.append(path)
    return merged


def check_adapter_state(state: Mapping[str, Any], model: nn.Module, what: str) -> None:
    """Refuse a ``state`` whose keys are not all adapter weights of ``model``, or that misses some of them."""
    expected = set(adapter_parameter_names(model))
    unknown = sorted(set(state) - set(model.state_dict()))
    missing = sorted(expected - set(state))
    if unknown or missing:
        raise ValueError(f"{what}: the adapter weights do not fit the model (unknown keys {unknown[:5]}, missing "
                         f"{missing[:5]}); use the same targets, method and rank as when they were saved.")


def current_parameter_name(model: nn.Module, name: str) -> str:
    """``name`` as the parameter is called now: a parameter recorded before an adapter wrapped its layer (``head.weight``)
    lives on under the tuner layer's ``base_layer`` (``head.base_layer.weight``) - the same parameter object. For
    techniques that record parameter names in ``setup`` when a fine-tuning callback later in the list wraps layers."""
    if name in dict(model.named_parameters()):
        return name
    for path in tuner_layers(model):
        if name.startswith(path + "."):
            moved = f"{path}.base_layer.{name[len(path) + 1:]}"
            if moved in dict(model.named_parameters()):
                return moved
    return name
