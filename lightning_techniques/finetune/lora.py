"""LoRA (Hu et al. 2021) and peft's other weight adapters (DoRA, IA3, LoHa, LoKr) on any module's layers.

Functional core: :func:`apply_lora` (inject into chosen layers, by name / regular expression / layer type),
:func:`merge_lora` (merge into the base weights and put the base layers back), :func:`adapter_state_dict`,
:func:`save_adapter` / :func:`load_adapter` (adapter-only files that load back onto a fresh base model).
Thin Lightning adapter: :class:`LoRA`.

The adapter layers are peft's (``peft.inject_adapter_in_model`` into exactly the resolved paths); what is written
here is the Lightning side: targets resolved with a clear error, freezing for the run, the optimizer, resume,
adapter-only checkpoints and the merge at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.validation import check_choice, check_number, check_positive
from lightning_techniques.finetune._peft import (
    adapter_parameter_names,
    adapter_state_dict,
    check_adapter_state,
    inject,
    merge_and_unload,
    outside_tuner_layers,
    peft_module,
    tuner_layers,
)
from lightning_techniques.finetune._trainable import FinetuneSession, check_targets, resolve_targets

_ABSENT = object()
Method = Literal["lora", "dora", "ia3", "loha", "lokr"]
METHODS = ("lora", "dora", "ia3", "loha", "lokr")
#: The peft tuner layer class name prefix of each method (to recognise an already adapted layer).
_LAYER_MODULE = {"lora": "peft.tuners.lora", "dora": "peft.tuners.lora", "ia3": "peft.tuners.ia3",
                 "loha": "peft.tuners.loha", "lokr": "peft.tuners.lokr"}
#: The layer types peft 0.21 adapts, per method (others are refused at setup with the list of what exists).
SUPPORTED_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "lora": (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding),
    "dora": (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding),
    "ia3": (nn.Linear, nn.Conv2d, nn.Conv3d),
    "loha": (nn.Linear, nn.Conv1d, nn.Conv2d),
    "lokr": (nn.Linear, nn.Conv1d, nn.Conv2d),
}


def check_lora_args(method: str, rank: int, alpha: float, dropout: float) -> None:
    """Validate the adapter arguments (``ValueError``/``TypeError`` naming the argument and what is allowed)."""
    check_choice("method", method, METHODS)
    check_positive("rank", rank, integer=True)
    check_positive("alpha", alpha)
    check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    if method == "ia3" and dropout:
        raise ValueError(f"dropout={dropout!r}: method='ia3' has no dropout; use dropout=0.")


def lora_config(method: str = "lora", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> Any:
    """The peft config of ``method`` (targets are set by :func:`apply_lora`): ``LoraConfig`` (``use_dora`` for
    DoRA; dropout on the adapter input), ``IA3Config`` (no rank), ``LoHaConfig`` / ``LoKrConfig`` (dropout on the
    rank dimension)."""
    check_lora_args(method, rank, alpha, dropout)
    peft = peft_module("LoRA")
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=method == "dora",
                               target_modules=[])
    if method == "ia3":
        return peft.IA3Config(target_modules=[], feedforward_modules=[])
    cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    return cls(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=[])


def resolve_lora_targets(model: nn.Module, targets: Sequence[str], method: str = "lora",
                         layer_types: tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """The paths ``targets`` select among the layers ``method`` can adapt (peft tuner layers already in the model
    count as their base layer; their insides are never selected); ``ValueError`` listing the layers that exist."""
    types = SUPPORTED_LAYERS[check_choice("method", method, METHODS)] if layer_types is None else layer_types
    view = outside_tuner_layers(model)
    existing = tuner_layers(model)
    hits = resolve_targets(view, list(targets), "targets", types=None)
    chosen = []
    for path in hits:
        layer = model.get_submodule(path)
        base = existing[path].get_base_layer() if path in existing else layer
        if isinstance(base, types):
            chosen.append(path)
    if not chosen:
        names = [f"{p} ({type(m).__name__})" for p, m in view.named_modules() if p and isinstance(m, types)]
        raise ValueError(f"targets={list(targets)!r} select no layer that method={method!r} can adapt "
                         f"({'/'.join(t.__name__ for t in types)}); those in the model: {', '.join(names) or 'none'}.")
    return chosen


def apply_lora(model: nn.Module, targets: Sequence[str] | str, method: str = "lora", rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Insert peft adapters of ``method`` into the layers ``targets`` select (names, regular expressions matched in
    full, or layer types); returns their paths. Layers that already carry an adapter of the same method are kept as
    they are (never wrapped twice); another method's adapter there is refused. The model's parameters keep their
    ``requires_grad`` (peft's freezing is undone); choose what trains with :func:`adapter_parameter_names`."""
    check_lora_args(method, rank, alpha, dropout)
    specs = check_targets("targets", targets)
    paths = resolve_lora_targets(model, specs, method)
    existing = tuner_layers(model)
    for path in paths:
        if path in existing and not type(existing[path]).__module__.startswith(_LAYER_MODULE[method]):
            raise ValueError(f"targets: {path!r} already carries a {type(existing[path]).__module__} adapter, not "
                             f"method={method!r}; adapt a fresh model.")
    new = [p for p in paths if p not in existing]
    if new:
        flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        inject(model, lora_config(method, rank, alpha, dropout), new)
        for param, flag in flags.values():
            param.requires_grad_(flag)
    return paths


def merge_lora(model: nn.Module, paths: Sequence[str] | None = None) -> list[str]:
    """Merge the adapters (at ``paths``, all when None) into the base weights and put the base layers back: the
    model has its original classes and ``state_dict`` keys, so ``YourModule.load_from_checkpoint`` reads it."""
    return merge_and_unload(model, paths)


def save_adapter(model: nn.Module, path: str | Path, method: str = "lora", rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0) -> Path:
    """Write only the adapter weights of ``model`` and the arguments that made them (plain data: loads with
    ``weights_only=True``) to ``path`` (atomically); :func:`load_adapter` puts them on a fresh base model."""
    layers = list(tuner_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (apply_lora / the LoRA callback adds them).")
    payload = {"format": "lightning_techniques.adapter/1", "paths": layers, "method": method, "rank": rank,
               "alpha": float(alpha), "dropout": float(dropout), "state_dict": adapter_state_dict(model)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_adapter(model: nn.Module, source: str | Path | Mapping[str, Any]) -> list[str]:
    """Insert the adapters saved by :func:`save_adapter` (a path or the loaded dict) into ``model`` - a fresh
    base model - at the same paths and load their weights; returns the paths. Mismatches are refused."""
    payload = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, Path)) else source
    if not isinstance(payload, Mapping) or payload.get("format") != "lightning_techniques.adapter/1":
        raise ValueError("load_adapter: not an adapter file written by save_adapter.")
    paths = apply_lora(model, [str(p) for p in payload["paths"]], payload["method"], int(payload["rank"]),
                       float(payload["alpha"]), float(payload["dropout"]))
    check_adapter_state(payload["state_dict"], model, "load_adapter")
    model.load_state_dict(payload["state_dict"], strict=False)
    return paths


class LoRA(LeanHooks, FinetuneSession, Callback):
    """Low-rank adapters (LoRA, Hu et al. 2021) - or peft's DoRA, IA3, LoHa, LoKr - on chosen layers of the user's
    unmodified LightningModule; only the adapter weights train, and only they reach the optimizer.

    Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen, "LoRA: Low-Rank Adaptation of Large Language Models",
    ICLR 2022 (arXiv 2021): a frozen weight ``W`` gets a trainable update ``(alpha / rank) * B A`` with ``A``
    ``rank x in``, ``B`` ``out x rank`` and ``B = 0`` at start. Other methods through the same callback (peft's
    layers): ``"dora"`` (Liu et al. 2024, magnitude + direction), ``"ia3"`` (Liu et al. 2022, learned scaling),
    ``"loha"`` (Hyeon-Woo et al. 2022, Hadamard product), ``"lokr"`` (Kronecker product).

    In ``setup`` (before ``configure_optimizers``) the adapters are inserted (:func:`apply_lora`; a layer that
    already has them - a second fit, a resume in the same process - is not wrapped twice) and every other parameter
    is frozen. Whether the module's own ``configure_optimizers`` or ``OptimizerCallback`` builds the optimizer, the
    frozen parameters are taken out of it before the first step; an optimizer that lacks the adapter weights (built
    before they existed) is refused with an error - never a run that silently trains nothing. At ``teardown`` and on
    an exception every other parameter's ``requires_grad`` is given back; the module keeps its adapters (the
    declared change, :attr:`changed_paths`) or, with ``merge=True``, gets the merged base layers back at the end of a
    finished fit (original classes and ``state_dict`` keys: the module's own ``load_from_checkpoint`` reads it).

    Args:
        targets: the layers to adapt: paths (``"head"``), regular expressions matched in full against
            ``named_modules()`` paths (``r"blocks\\.\\d+\\.attn\\..*_proj"``), or layer types (``"Linear"``, an import
            path); only layer types the method supports are selected; nothing selected is refused at setup with
            the list of the layers that exist.
        method: ``"lora"``, ``"dora"``, ``"ia3"``, ``"loha"`` or ``"lokr"``.
        rank: the adapters' rank (``> 0``; IA3 has none).
        alpha: the scaling numerator (``> 0``): the update is scaled by ``alpha / rank``.
        dropout: dropout in ``[0, 1)`` on the adapter input (LoRA / DoRA) or the rank dimension (LoHa / LoKr).
        merge: merge the adapters into the base weights when ``fit`` ends (not after a failed fit).
        adapter_only_checkpoints: checkpoints hold only the adapter weights (a few KB); resuming from one needs the
            same base model (its weights are taken from the module given to ``fit``).
        train_also: names / regular expressions of submodules that train fully as well (e.g. a new ``"head"``).

    Example::

        from lightning_techniques import LoRA
        lora = LoRA(targets=["features.0", "head"], rank=4, alpha=8)
        L.Trainer(max_steps=20, callbacks=[lora]).fit(DigitsCNN(channels=8), datamodule=DigitsDataModule())

    Limits: one adapter per run (one of the package's fine-tuning callbacks at a time); layer types are those peft
    supports for the method (``SUPPORTED_LAYERS``); FSDP / DeepSpeed are not supported; a module that builds its
    optimizer before ``setup`` is refused (the adapters do not exist yet).
    """

    takes_over = frozenset({"configure_optimizers"})
    conflicts_with: tuple[str, ...] = ("QLoRA", "ReLoRA", "AdaLoRA", "PromptTuning", "PrefixTuning", "Adapters")
    changes_module = True

    def __init__(self, targets: Sequence[str] | str, method: Method = "lora", rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, merge: bool = False, adapter_only_checkpoints: bool = False,
                 train_also: Sequence[str] = ()) -> None:
        self.targets = check_targets("targets", targets)
        check_lora_args(method, rank, alpha, dropout)
        self.method, self.rank, self.alpha, self.dropout = method, rank, alpha, dropout
        for name, flag in (("merge", merge), ("adapter_only_checkpoints", adapter_only_checkpoints)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        self.merge = merge
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.train_also = check_targets("train_also", train_also, allow_empty=True)
        self._changed: tuple[str, ...] = ()
        self._strict: tuple[Any, Any] | None = None

    @property
    def changed_paths(self) -> tuple[str, ...]:
        """The ``named_modules()`` paths whose layers carry (or, merged, carried) an adapter; empty before setup."""
        return self._changed

    def _apply(self, pl_module: nn.Module) -> list[str]:
        return apply_lora(pl_module, self.targets, self.method, self.rank, self.alpha, self.dropout)

    # ------------------------------------------------------------------------------------------------- the run
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if stage in ("validate", "test", "predict") and not tuner_layers(pl_module) and not self._changed:
                self._changed = tuple(self._apply(pl_module))  # to evaluate / load an adapted checkpoint
            return
        check_conflicts(trainer, self)
        extra = resolve_targets(outside_tuner_layers(pl_module), self.train_also, "train_also") if self.train_also else []
        self._begin(pl_module)
        try:
            paths = self._apply(pl_module)
        except Exception:
            self._end()
            raise
        self._changed = tuple(paths)
        self._train_only(pl_module, adapter_parameter_names(pl_module, paths) + list(extra))
        if self.adapter_only_checkpoints:
            # the checkpoint lacks the base weights: they stay those of the module given to fit (restored at the end)
            self._strict = (pl_module, vars(pl_module).get("_strict_loading", _ABSENT))
            pl_module.strict_loading = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)  # frozen parameters out of every optimizer
        held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise RuntimeError(
                f"LoRA: the optimizer does not hold the trainable adapter weights {missing[:4]} (it was built before "
                "the adapters were inserted in setup); build it in configure_optimizers from self.parameters() or "
                "use OptimizerCallback.")
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        rank_zero_info(f"LoRA ({self.method}): {trainable} of {total} parameters train "
                       f"({100.0 * trainable / max(total, 1):.2f}%) in {len(self._changed)} layers.")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.adapter_only_checkpoints and "state_dict" in checkpoint:
            keep = set(adapter_parameter_names(pl_module)) | {
                k for k in checkpoint["state_dict"] if any(k.startswith(p + ".") for p in self._train_also_paths(pl_module))}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def _train_also_paths(self, pl_module: Any) -> list[str]:
        return resolve_targets(outside_tuner_layers(pl_module), self.train_also, "train_also") if self.train_also else []

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        if self.adapter_only_checkpoints:
            unknown = sorted(set(state) - set(pl_module.state_dict()))
            missing = sorted(set(adapter_parameter_names(pl_module)) - set(state))
            if unknown or missing:
                raise ValueError(f"LoRA: the checkpoint's weights do not fit the adapted module (unknown keys "
                                 f"{unknown[:5]}, missing adapter weights {missing[:5]}).")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.merge:
            merge_lora(pl_module, self._changed)

    def _end_run(self) -> None:
        self._end()
        if self._strict is not None:
            module, value = self._strict
            if value is _ABSENT:
                vars(module).pop("_strict_loading", None)
            else:
                vars(module)["_strict_loading"] = value
            self._strict = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._end_run()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end_run()

    def state_dict(self) -> dict[str, Any]:
        return {"changed_paths": list(self._changed), "method": self.method, "rank": self.rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("changed_paths")
        if saved and self._changed and list(self._changed) != list(saved):
            raise ValueError(f"LoRA: the checkpoint's adapters sit at {saved}, this run's at {list(self._changed)}; "
                             "use the same targets to resume.")
        for key in ("method", "rank"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"LoRA: the checkpoint was trained with {key}={state_dict[key]!r}, this run has "
                                 f"{key}={getattr(self, key)!r}.")
