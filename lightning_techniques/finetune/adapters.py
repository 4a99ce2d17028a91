"""Bottleneck adapters (Houlsby et al. 2019) after chosen sublayers of any module; only the adapters train.

Functional core: :class:`BottleneckAdapter`, :func:`add_adapters`, :func:`remove_adapters`, :func:`adapter_size`.
Thin Lightning adapter: :class:`Adapters`.

Written here, not taken from peft: peft 0.21 has no Houlsby bottleneck adapter for arbitrary modules (its
"adaption prompt" and "bone"/"vera" tuners are other methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_number, check_positive
from lightning_techniques.finetune._trainable import FinetuneSession, check_targets, resolve_targets

#: The attribute (child module name) an adapter is registered under on the layer it follows.
ADAPTER_NAME = "bottleneck_adapter"

#: The parameter-efficient fine-tuning methods of this module family: one per run (each freezes everything but its
#: own parameters, so a second one would freeze the first one's), refused at setup by the conflict check (one side's
#: declaration is enough, so LoRA / QLoRA name these in theirs).
PEFT_METHODS = ("ReLoRA", "AdaLoRA", "PromptTuning", "PrefixTuning", "Adapters")


def other_methods(name: str) -> tuple[str, ...]:
    return tuple(method for method in PEFT_METHODS if method != name)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
Activation = Literal["relu", "gelu", "tanh", "silu"]


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` over the feature dimension ``dim`` of ``h`` (Houlsby et al. 2019, Fig. 2).

    ``up`` starts near zero (normal with std ``init_std``; exactly zero when ``init_std=0``), so the adapter starts as
    (near) identity and the pre-trained model's outputs are kept at the start of fine-tuning.
    """

    def __init__(self, size: int, bottleneck: int, activation: str = "relu", dim: int = -1, init_std: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive("size", size, integer=True)
        check_positive("bottleneck", bottleneck, integer=True)
        check_choice("activation", activation, list(_ACTIVATIONS))
        check_non_negative("init_std", init_std)
        self.dim = dim
        self.down = nn.Linear(size, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, size)
        with torch.no_grad():
            # down: the default nn.Linear (Kaiming-uniform) init, drawn from `generator` (the global RNG untouched)
            bound = 1.0 / size ** 0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.zero_()
            self.up.weight.normal_(0.0, init_std, generator=generator) if init_std > 0 else self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dim in (-1, h.ndim - 1):
            return h + self.up(self.act(self.down(h)))
        moved = h.movedim(self.dim, -1)
        return h + self.up(self.act(self.down(moved))).movedim(-1, self.dim)


def _adapter_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the layer's output through its adapter (first element of a tuple output, e.g. HF layers or
    ``nn.MultiheadAttention``). Module-level, so a module holding it still pickles."""
    adapter = module._modules[ADAPTER_NAME]
    assert adapter is not None
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


_SIZED: tuple[tuple[type[nn.Module], str, int], ...] = (
    (nn.Linear, "out_features", -1),
    (nn.Conv1d, "out_channels", 1),
    (nn.Conv2d, "out_channels", 1),
    (nn.Conv3d, "out_channels", 1),
    (nn.Embedding, "embedding_dim", -1),
    (nn.MultiheadAttention, "embed_dim", -1),
    (nn.modules.batchnorm._BatchNorm, "num_features", 1),
    (nn.GroupNorm, "num_channels", 1),
)


def _own_size(layer: nn.Module) -> tuple[int, int] | None:
    if isinstance(layer, nn.LayerNorm):
        return int(layer.normalized_shape[-1]), -1
    for cls, attr, dim in _SIZED:
        if isinstance(layer, cls):
            return int(getattr(layer, attr)), dim
    return None


def adapter_size(layer: nn.Module) -> tuple[int, int]:
    """``(features, dim)`` of ``layer``'s output: from the layer itself (Linear, ConvNd, Embedding, LayerNorm, norms,
    MultiheadAttention) or else from its last such submodule (a transformer block ends in its MLP's last Linear).
    Raises ``ValueError`` when neither tells (pass ``size=`` to :func:`add_adapters`)."""
    own = _own_size(layer)
    if own is not None:
        return own
    found = None
    for name, sub in layer.named_modules():
        if sub is not layer and ADAPTER_NAME not in name.split("."):
            found = _own_size(sub) or found
    if found is None:
        raise ValueError(
            f"cannot tell the output size of {type(layer).__name__} (no Linear/Conv/norm/Embedding inside): pass size="
        )
    return found


def add_adapters(model: nn.Module, targets: Sequence[str], bottleneck: int = 8, activation: str = "relu",
                 init_std: float = 1e-3, size: int | None = None, dim: int | None = None, seed: int = 0) -> list[str]:
    """Insert a :class:`BottleneckAdapter` after each named submodule of ``model`` (its output goes through
    ``h + up(act(down(h)))``); returns the paths that got one.

    The adapter is registered as the child ``bottleneck_adapter`` of the layer it follows and applied by a forward
    hook, so the base layers' ``state_dict`` keys stay as they were (a pre-trained checkpoint still loads) and
    the adapter's keys are ``<layer>.bottleneck_adapter.*``. Initialised from ``torch.Generator().manual_seed(seed)``
    (the global random state is not touched; every DDP rank gets the same adapters).
    """
    check_positive("bottleneck", bottleneck, integer=True)
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"add_adapters: no submodule named {missing}; the model has {sorted(n for n in modules if n)}")
    generator = torch.Generator().manual_seed(seed)
    done = []
    for path in targets:
        layer = modules[path]
        if ADAPTER_NAME in layer._modules:
            raise ValueError(f"add_adapters: {path!r} already has an adapter.")
        features, feature_dim = adapter_size(layer) if size is None else (size, -1 if dim is None else dim)
        feature_dim = feature_dim if dim is None else dim
        param = next(layer.parameters(), None)
        adapter = BottleneckAdapter(features, bottleneck, activation, feature_dim, init_std, generator)
        if param is not None:
            adapter.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
        layer.add_module(ADAPTER_NAME, adapter)
        layer.register_forward_hook(_adapter_hook)
        done.append(path)
    return done


def remove_adapters(model: nn.Module, paths: Sequence[str] | None = None) -> list[str]:
    """Remove the adapters :func:`add_adapters` inserted (all, or those under ``paths``); returns the paths."""
    removed = []
    for path, layer in list(model.named_modules()):
        if ADAPTER_NAME not in layer._modules or (paths is not None and path not in paths):
            continue
        for key, hook in list(layer._forward_hooks.items()):
            if hook is _adapter_hook:
                del layer._forward_hooks[key]
        del layer._modules[ADAPTER_NAME]
        removed.append(path)
    return removed


class Adapters(LeanHooks, FinetuneSession, Callback):
    """Bottleneck adapters (Houlsby et al. 2019) inserted after chosen sublayers of the user's module; only the
    adapters (and the parameters of ``train_also``) train, and only they reach the optimizer.

    Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan & Gelly, "Parameter-Efficient
    Transfer Learning for NLP", ICML 2019. Each adapter is ``h + W_up act(W_down h)`` on the layer's output
    (features on the last dimension; channels for convolutions and batch/group norms), with ``W_up`` initialised
    near zero: the adapted model starts as the pre-trained one.

    In ``setup`` the adapters are added (:func:`add_adapters`: a child ``bottleneck_adapter`` of each target plus a
    forward hook; the base layers' ``state_dict`` keys are unchanged) and every other parameter is frozen; the
    optimizer built by the module's ``configure_optimizers`` (or by ``OptimizerCallback``) receives only the
    trainable ones. After ``fit`` - finished or failed - the module keeps its adapters (the declared change,
    :attr:`changed_paths`) and every other parameter's ``requires_grad`` is as before. A fresh module loads a
    checkpoint of the adapted one after ``add_adapters(module, callback.changed_paths, ...)`` with the same arguments.

    Args:
        targets: the sublayers to follow with an adapter: names (``"features.0"``), regular expressions matched in
            full against ``named_modules()`` paths, or layer types (``"TransformerBlock"``, an import path or a class);
            a target matching nothing is refused at setup with the list of layers that exist.
        bottleneck: the adapter's inner width (``> 0``).
        activation: the adapter's nonlinearity.
        init_std: std of the up-projection's initial weights (0: exactly the identity at start).
        train_also: names / regular expressions of submodules whose parameters train too (e.g. ``["head"]``).
        seed: seed of the adapters' initialisation (the global random state is not used).

    Example::

        from lightning_techniques import Adapters
        adapters = Adapters(targets=["net.0", "net.2"], bottleneck=4, train_also=["net.4"])
        L.Trainer(max_epochs=5, callbacks=[adapters]).fit(TabularMLP(), datamodule=BreastCancerDataModule())

    Limits: adapters follow a layer's whole output (the first element of a tuple output); the layer's output size
    is read from the layer (or its last Linear / conv / norm), for others pass ``size`` through :func:`add_adapters`.
    One parameter-efficient method per run (LoRA, QLoRA, ReLoRA, AdaLoRA, prompt / prefix tuning are refused beside
    it at setup). FSDP/DeepSpeed are not supported.
    """

    takes_over = frozenset({"configure_optimizers"})
    conflicts_with: tuple[str, ...] = other_methods("Adapters")
    changes_module = True

    def __init__(self, targets: Sequence[str] | str, bottleneck: int = 8, activation: Activation = "relu",
                 init_std: float = 1e-3, train_also: Sequence[str] = (), seed: int = 0) -> None:
        self.targets = check_targets("targets", targets)
        self.bottleneck = check_positive("bottleneck", bottleneck, integer=True)
        self.activation = check_choice("activation", activation, list(_ACTIVATIONS))
        self.init_std = check_non_negative("init_std", init_std)
        self.train_also = check_targets("train_also", train_also, allow_empty=True)
        self.seed = check_number("seed", seed, integer=True)
        self._changed: tuple[str, ...] = ()

    @property
    def changed_paths(self) -> tuple[str, ...]:
        """The ``named_modules()`` paths that got an adapter (empty before setup)."""
        return self._changed

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if stage in ("validate", "test", "predict") and not self._changed and not any(
                    ADAPTER_NAME in m._modules for m in pl_module.modules()):
                # a fresh module evaluated from an adapted checkpoint (trainer.test(module, ckpt_path=...))
                paths = resolve_targets(pl_module, self.targets, "targets")
                self._changed = tuple(add_adapters(pl_module, paths, self.bottleneck, self.activation,
                                                   self.init_std, seed=self.seed))
            return
        check_conflicts(trainer, self)
        paths = [p for p in resolve_targets(pl_module, self.targets, "targets") if ADAPTER_NAME not in p.split(".")]
        extra = resolve_targets(pl_module, self.train_also, "train_also") if self.train_also else []
        present = [p for p in paths if ADAPTER_NAME in dict(pl_module.named_modules())[p]._modules]
        added = present
        if present and len(present) != len(paths):
            raise ValueError(f"Adapters: {present} already have adapters, the other targets do not.")
        self._begin(pl_module)
        if not present:
            added = add_adapters(pl_module, paths, self.bottleneck, self.activation, self.init_std, seed=self.seed)
        self._changed = tuple(added)
        self._train_only(pl_module, [f"{p}.{ADAPTER_NAME}" for p in added] + list(extra))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end()

    def state_dict(self) -> dict[str, Any]:
        return {"changed_paths": list(self._changed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("changed_paths") and self._changed and list(self._changed) != state_dict["changed_paths"]:
            raise ValueError(f"Adapters: the checkpoint's adapters sit at {state_dict['changed_paths']}, this run's at "
                             f"{list(self._changed)}; use the same targets to resume.")
