"""Batch-normalisation techniques: precise population statistics (:class:`PreciseBN`), frozen BatchNorm layers
(:class:`FreezeBatchNorm`), BatchNorm replaced by GroupNorm / LayerNorm (:class:`NormSwap`) and SyncBatchNorm on
chosen layers under DDP (:class:`SyncBatchNormConversion`).

Functional cores: :func:`batchnorm_layers` (the BN layers of a model, chosen by path / regex / type),
:func:`precise_bn_stats_` (recompute running statistics as the average over given batches),
:func:`group_norm_from_batch_norm` / :func:`swap_batch_norm_` (the swap, affine weights carried over),
:func:`convert_sync_batchnorm_` / :func:`revert_sync_batchnorm_` (chosen layers to ``nn.SyncBatchNorm`` and back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_techniques._internal import compat
from lightning_techniques._internal.batch import get_inputs
from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.distributed import all_reduce_sum
from lightning_techniques._internal.eval_stages import fetch_samples
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.sampling import seeded_permutation
from lightning_techniques._internal.validation import check_choice, check_number, check_positive
from lightning_techniques.augment._seeding import derive_seed
from lightning_techniques.finetune._trainable import check_targets, resolve_targets

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------- core


def batchnorm_layers(model: nn.Module, targets: Sequence[str] | None = None, argument: str = "targets",
                     ) -> list[tuple[str, _BatchNorm]]:
    """``(path, layer)`` of the BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants) of
    ``model``, in module order; ``targets`` (layer paths, regular expressions matched in full, or layer types)
    restricts them. Raises ``ValueError`` when the model has no BatchNorm layer, or when a target matches none
    (the message lists the layers that exist)."""
    found = [(path, m) for path, m in model.named_modules() if path and isinstance(m, _BatchNorm)]
    if not found:
        layers = [f"{path} ({type(m).__name__})" for path, m in model.named_modules() if path]
        raise ValueError(f"the model has no BatchNorm layer (nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm); its layers: "
                         f"{', '.join(layers) or '(none)'}.")
    if targets is None:
        return found
    chosen = set(resolve_targets(model, list(targets), argument, types=(_BatchNorm,)))
    return [(path, m) for path, m in found if path in chosen]


@torch.no_grad()
def precise_bn_stats_(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    layers: Sequence[_BatchNorm] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers over ``batches``; returns the number of
    batches seen (summed over ranks when ``reduce`` is given).

    Wu & Johnson 2021 ("precise BN"): each layer's ``running_mean`` / ``running_var`` become the plain average, over
    the batches, of the per-batch mean and (unbiased) variance of its input - PyTorch's cumulative average,
    ``momentum=None`` - instead of the exponential moving average training leaves. The BN layers run in train mode
    (batch statistics, as in training); every other module runs in eval mode (no dropout, no random draws).
    ``forward(model, batch)`` runs one batch (default ``model(batch)``); ``reduce`` sums a tensor over processes
    (DDP: every rank passes its share of the batches and the averages are combined exactly). Modes, momenta and
    ``num_batches_tracked`` are restored afterwards; layers without running statistics are skipped.
    """
    forward = forward or (lambda m, b: m(b))
    bns = [m for m in (layers if layers is not None else model.modules())
           if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
    modes = {m: m.training for m in model.modules()}
    saved = [(bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()) for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: running = mean over batches of the batch statistics
            bn.train()
        count = 0
        for batch in batches:
            forward(model, batch)
            count += 1
        if reduce is not None:
            local = torch.tensor(float(count), dtype=torch.float64)
            total = float(reduce(local).item())
            for bn in bns:
                for buf in (bn.running_mean, bn.running_var):
                    assert buf is not None
                    summed = reduce(buf.double() * count)
                    buf.copy_((summed / max(total, 1.0)).to(buf.dtype))
            count = int(round(total))
        return count
    finally:
        for bn, (momentum, tracked) in zip(bns, saved):
            bn.momentum = momentum
            if tracked is not None and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
        for m, mode in modes.items():
            m.training = mode


def _train_loader(trainer: Any) -> Any:
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


# ------------------------------------------------------------------------------------------------------------ adapter


class PreciseBN(LeanHooks, Callback):
    """Recompute BatchNorm running statistics as true averages over many training batches before evaluation.

    Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (section 3, "precise BN"; fvcore's ``update_bn_stats``):
    the exponential moving average that training leaves in ``running_mean`` / ``running_var`` lags behind the
    weights and is dominated by the last batches; precise BN replaces it with the average, over ``num_batches``
    training batches taken with the current weights, of each batch's mean and unbiased variance (PyTorch's
    ``momentum=None`` cumulative average). The batches are drawn without replacement from the training dataset
    by a permutation seeded with ``(seed, global_step)`` - reproducible and exact on resume, the same on every
    rank - collated with the train loader's ``collate_fn`` and passed through the train stage's batch-transfer
    hooks (:func:`~lightning_techniques.mechanisms.fetch_samples`), so they are the inputs the model sees in
    training. Under DDP each rank runs every ``world_size``-th batch and the averages are all-reduced exactly. Other
    layers run in eval mode during the pass (no dropout); all modes, momenta and ``num_batches_tracked`` are
    restored. The batch indices of the last recompute are in ``last_indices``.

    Args:
        num_batches: training batches to average over (fewer when the training set is smaller).
        batch_size: samples per batch (default: the train loader's ``batch_size``); statistics depend on it, as in
            training.
        before_validation: recompute before each validation run during ``fit`` (not the sanity check).
        at_fit_end: recompute once more when training ends (the weights ``fit`` leaves get their statistics).
        input_key: where the input is in a dict / tuple batch (default: element 0 or a known key such as ``"x"``).
        seed: base seed of the batch choice.

    Example::

        trainer = L.Trainer(callbacks=[PreciseBN(num_batches=50)])

    Limits: a map-style training dataset (``len`` and ``__getitem__``); the input is fed to ``forward`` as one
    tensor; the variance is the average of per-batch variances (as PyTorch's BN and fvcore's precise BN define it),
    not the variance of the pooled population. A checkpoint saved at a step's end *before* that step's validation
    resumes without the recompute that validation did; the next recompute starts from scratch, so the runs agree
    again from there.
    """

    takes_over: frozenset[str] = frozenset({"eval_hooks"})  # works at the start of validation
    conflicts_with: tuple[str, ...] = ("FreezeBatchNorm",)  # one keeps the statistics fixed, the other rewrites them

    def __init__(self, num_batches: int = 100, batch_size: int | None = None, before_validation: bool = True,
                 at_fit_end: bool = True, input_key: str | int | None = None, seed: int = 0) -> None:
        check_positive("num_batches", num_batches, integer=True)
        if batch_size is not None:
            check_positive("batch_size", batch_size, integer=True)
        for name, flag in (("before_validation", before_validation), ("at_fit_end", at_fit_end)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        if not (before_validation or at_fit_end):
            raise ValueError("before_validation=False and at_fit_end=False: PreciseBN would never run; enable one.")
        check_number("seed", seed, low=0, integer=True)
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.before_validation = before_validation
        self.at_fit_end = at_fit_end
        self.input_key = input_key
        self.seed = seed
        self.last_indices: list[list[int]] = []
        self.recomputed = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        layers = batchnorm_layers(pl_module)
        if not any(m.track_running_stats for _, m in layers):
            raise ValueError("PreciseBN: no BatchNorm layer of the model tracks running statistics "
                             f"(track_running_stats=False on {[p for p, _ in layers]}).")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.before_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.recompute(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.at_fit_end:
            self.recompute(trainer, pl_module)

    def _choose(self, trainer: Any, size: int, batch_size: int) -> list[list[int]]:
        order = seeded_permutation(size, derive_seed(self.seed, int(trainer.global_step)))
        n = min(self.num_batches, max(size // batch_size, 1))
        return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(n)]

    def recompute(self, trainer: Any, pl_module: Any) -> int:
        """Recompute the statistics now (what the hooks call); returns the number of batches averaged."""
        loader = _train_loader(trainer)
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise RuntimeError("PreciseBN needs a map-style training dataset (with __len__ and __getitem__).")
        batch_size = self.batch_size or getattr(loader, "batch_size", None)
        if not batch_size:
            raise ValueError("PreciseBN: the train loader has no batch_size (a batch_sampler?); pass batch_size=...")
        collate = getattr(loader, "collate_fn", None)
        chosen = self._choose(trainer, len(dataset), int(batch_size))
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        mine = chosen[rank::world]

        def batches() -> Iterable[Any]:
            for indices in mine:
                yield fetch_samples(trainer, dataset, indices, "train", collate)[1]

        def forward(model: nn.Module, batch: Any) -> Any:
            return model(get_inputs(batch, self.input_key))

        with torch.inference_mode(False):  # Lightning's evaluation runs under inference_mode: keep normal buffers
            precise_bn_stats_(pl_module, batches(), forward,
                              reduce=lambda t: all_reduce_sum(trainer.strategy, t) if world > 1 else t.clone())
        self.last_indices = chosen
        self.recomputed += 1
        return len(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"recomputed": self.recomputed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recomputed = int(state_dict.get("recomputed", 0))


class FreezeBatchNorm(LeanHooks, Callback):
    """Freeze BatchNorm layers during training: their running statistics (eval mode) and/or their affine weights.

    The usual recipe for fine-tuning with small batches or on a shifted dataset (e.g. detection / segmentation
    backbones; Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, section 5; Ioffe & Szegedy 2015 for BN): the
    statistics learned on large batches are kept instead of being overwritten by noisy small-batch estimates, and
    the layers normalise with them in training too. ``freeze_stats`` keeps the chosen layers in eval mode for every
    training batch (set in ``on_train_batch_start``, after Lightning puts the model in train mode);
    ``freeze_affine`` sets ``requires_grad=False`` on their ``weight`` / ``bias`` in ``setup`` (before the optimizer
    is built: parameters without gradients are not stepped, not even by weight decay). Modes and ``requires_grad``
    are restored at teardown and on an exception.

    Args:
        targets: which BN layers - layer paths, regular expressions matched in full against paths, or layer types
            (e.g. ``["backbone\\..*"]``); default every BatchNorm layer.
        freeze_stats: keep the running statistics fixed (layers in eval mode during training).
        freeze_affine: keep gamma / beta fixed (``requires_grad=False``).

    Example::

        trainer = L.Trainer(callbacks=[FreezeBatchNorm(targets=["features\\.1\\.0"], freeze_affine=False)])

    Limits: an optimizer with weight decay that the user builds over parameters *with* a gradient only is
    unaffected; an optimizer that steps parameters without gradients (rare) would move the frozen affine weights.
    The frozen layers normalise with their running statistics during training, so freezing layers whose statistics
    were never trained (fresh ``running_mean = 0``, ``running_var = 1``) makes them plain affine maps.
    """

    takes_over: frozenset[str] = frozenset()
    conflicts_with: tuple[str, ...] = ("PreciseBN",)

    def __init__(self, targets: list[str] | None = None, freeze_stats: bool = True, freeze_affine: bool = True) -> None:
        if targets is not None:
            targets = check_targets("targets", targets)
        for name, flag in (("freeze_stats", freeze_stats), ("freeze_affine", freeze_affine)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        if not (freeze_stats or freeze_affine):
            raise ValueError("freeze_stats=False and freeze_affine=False freeze nothing; enable one.")
        self.targets = targets
        self.freeze_stats = freeze_stats
        self.freeze_affine = freeze_affine
        self.frozen_layers: list[str] = []
        self._layers: list[_BatchNorm] = []
        self._modes: list[bool] = []
        self._grads: list[tuple[nn.Parameter, bool]] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        chosen = batchnorm_layers(pl_module, self.targets)
        self._release()  # a previous failed run of this object
        self.frozen_layers = [path for path, _ in chosen]
        self._layers = [m for _, m in chosen]
        self._modes = [m.training for m in self._layers]
        if self.freeze_affine:
            for m in self._layers:
                for p in (m.weight, m.bias):
                    if p is not None:
                        self._grads.append((p, p.requires_grad))
                        p.requires_grad_(False)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.freeze_stats:
            for m in self._layers:
                m.eval()

    def _release(self) -> None:
        for m, mode in zip(self._layers, self._modes):
            m.train(mode)
        for p, flag in self._grads:
            p.requires_grad_(flag)
        self._layers, self._modes, self._grads = [], [], []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._release()

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_layers": list(self.frozen_layers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # which layers are frozen follows from the arguments and the module


# ------------------------------------------------------------------------------------------ BatchNorm -> GroupNorm swap

SwapTarget = Literal["group", "layer", "instance"]
SWAP_TARGETS = ("group", "layer", "instance")


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def group_norm_from_batch_norm(bn: _BatchNorm, to: str = "group", num_groups: int = 32,
                               path: str = "layer") -> nn.GroupNorm:
    """A ``nn.GroupNorm`` that replaces ``bn``: ``"group"`` with ``min(num_groups, C)`` groups (which must divide
    ``C``), ``"layer"`` with one group (LayerNorm over channels and positions), ``"instance"`` with ``C`` groups;
    ``bn``'s ``eps``, per-channel ``weight`` / ``bias`` (copied), device and dtype. Running statistics have no
    counterpart and are dropped."""
    check_choice("to", to, SWAP_TARGETS)
    channels = bn.num_features
    groups = {"group": min(num_groups, channels), "layer": 1, "instance": channels}[to]
    if channels % groups:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(f"num_groups={num_groups}: {path} has {channels} channels, not divisible into {groups} "
                         f"groups; choose one of {divisors}.")
    ref = bn.weight if bn.weight is not None else bn.running_mean
    gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine,
                      device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def swap_batch_norm_(model: nn.Module, to: str = "group", num_groups: int = 32,
                     targets: Sequence[str] | None = None) -> list[str]:
    """Replace ``model``'s BatchNorm layers (all, or those ``targets`` select) in place with
    :func:`group_norm_from_batch_norm`; returns the replaced paths. All layers are checked before any is replaced."""
    chosen = batchnorm_layers(model, targets)
    new = [(path, group_norm_from_batch_norm(bn, to, num_groups, path)) for path, bn in chosen]
    for path, layer in new:
        _set_submodule(model, path, layer)
    return [path for path, _ in new]


class NormSwap(LeanHooks, Callback):
    """Replace BatchNorm layers with GroupNorm / LayerNorm / InstanceNorm for training with tiny batches.

    Wu & He, "Group Normalization", ECCV 2018: BatchNorm's error grows quickly as the batch shrinks (its statistics
    are estimated from the batch), GroupNorm normalises each sample over groups of channels and is independent of the
    batch size; LayerNorm (Ba et al. 2016) and InstanceNorm (Ulyanov et al. 2016) are its one-group and
    one-channel-per-group extremes. In ``setup`` - before Lightning builds the optimizer, so it gets the new
    parameters - each chosen ``nn.BatchNorm*d`` becomes an ``nn.GroupNorm`` with the same ``eps`` and its per-channel
    ``weight`` / ``bias`` carried over (their meaning - scale and shift per channel after normalisation - is the same);
    the running statistics have no counterpart and are dropped. This is a **declared change** of the module
    (``changes_module = True``; the replaced paths are in ``changed_paths``): the trained model keeps the new layers
    after ``fit`` (that is its architecture now), also after a failed run. On resume the swap is made again on the
    fresh module in ``setup`` and the checkpoint's GroupNorm weights load into it; the same object never swaps twice.

    Args:
        to: ``"group"`` (``min(num_groups, C)`` groups), ``"layer"`` (one group: normalises over channels and
            positions, per-channel affine) or ``"instance"`` (``C`` groups).
        num_groups: groups for ``"group"`` (32 in the paper); must divide each layer's channel count.
        targets: which BN layers - paths, regular expressions matched in full, or layer types; default all.

    Example::

        trainer = L.Trainer(callbacks=[NormSwap(to="group", num_groups=8)])

    Limits: the normalisation changes, so a model *pre-trained* with BN behaves differently right after the swap
    (the carried gamma / beta are a starting point, not an equivalence) - fine-tune it; ``"layer"`` is
    ``GroupNorm(1, C)`` (LayerNorm over ``(C, *positions)`` with per-channel affine), not ``nn.LayerNorm`` over the
    last dimension; lazy BatchNorm layers must be initialised first; an optimizer the module built before ``fit``
    (rare) would hold the old parameters.
    """

    takes_over: frozenset[str] = frozenset()
    conflicts_with: tuple[str, ...] = ("PreciseBN", "FreezeBatchNorm", "SyncBatchNormConversion")  # BN goes away
    changes_module: bool = True

    def __init__(self, to: SwapTarget = "group", num_groups: int = 32, targets: list[str] | None = None) -> None:
        check_choice("to", to, SWAP_TARGETS)
        check_positive("num_groups", num_groups, integer=True)
        if targets is not None:
            targets = check_targets("targets", targets)
        self.to = to
        self.num_groups = num_groups
        self.targets = targets
        self._changed: tuple[str, ...] = ()
        self._module_id: int | None = None

    @property
    def changed_paths(self) -> tuple[str, ...]:
        """The ``named_modules()`` paths of the layers this object replaced (empty before ``setup``)."""
        return self._changed

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        if self._module_id == id(pl_module) and all(
                isinstance(pl_module.get_submodule(p), nn.GroupNorm) for p in self._changed):
            return  # already swapped on this module (a second fit with the same objects)
        self._changed = tuple(swap_batch_norm_(pl_module, self.to, self.num_groups, self.targets))
        self._module_id = id(pl_module)
        _log.info("NormSwap: replaced %s with GroupNorm (%s).", ", ".join(self._changed), self.to)

    def state_dict(self) -> dict[str, Any]:
        return {"changed_paths": list(self._changed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = tuple(state_dict.get("changed_paths", ()))
        if self._changed and saved and saved != self._changed:
            raise ValueError(f"NormSwap: the checkpoint swapped {list(saved)}, this run swapped {list(self._changed)}; "
                             "use the same targets to resume.")


# ------------------------------------------------------------------------------------ SyncBatchNorm on chosen layers


def convert_sync_batchnorm_(model: nn.Module, paths: Sequence[str], process_group: Any = None,
                            ) -> dict[str, _BatchNorm]:
    """Replace the BatchNorm layers at ``paths`` in place with ``nn.SyncBatchNorm`` layers that share their
    parameters and buffers (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` per layer); returns the original
    layer objects by path, for :func:`revert_sync_batchnorm_`. Layers already synchronised are left alone."""
    originals: dict[str, _BatchNorm] = {}
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, nn.SyncBatchNorm) or not isinstance(layer, _BatchNorm):
            continue
        originals[path] = layer
        _set_submodule(model, path, nn.SyncBatchNorm.convert_sync_batchnorm(layer, process_group))
    return originals


def revert_sync_batchnorm_(model: nn.Module, originals: dict[str, _BatchNorm]) -> None:
    """Put the original layer objects back at their paths, carrying the trained parameters and the current buffers
    (and mode) of the ``SyncBatchNorm`` layers that replaced them: class, attributes and hooks are the originals'."""
    for path, original in originals.items():
        current = model.get_submodule(path)
        for name in list(original._parameters):
            original._parameters[name] = current._parameters.get(name)
        for name in list(original._buffers):
            original._buffers[name] = current._buffers.get(name)
        original.train(current.training)
        _set_submodule(model, path, original)


class SyncBatchNormConversion(LeanHooks, Callback):
    """Synchronise the statistics of chosen BatchNorm layers across DDP processes (``nn.SyncBatchNorm``) for one fit.

    Ioffe & Szegedy 2015 (BatchNorm); synchronised BN as in Peng et al., "MegDet", CVPR 2018 (cross-GPU BN for
    small per-GPU batches). Under DDP each process normalises with the statistics of its own share of the batch;
    with small per-device batches that share is too small for good estimates, and ``nn.SyncBatchNorm`` computes
    them over the global batch. In ``setup`` (before Lightning wraps the model in DDP and builds the optimizer) the
    chosen layers become ``nn.SyncBatchNorm`` layers that share their parameters and buffers; at teardown - and on
    an exception - the original layer objects are put back with the trained parameters and the current buffers, so
    after ``fit`` the module has its own classes again.

    Versus ``Trainer(sync_batchnorm=True)``: Lightning converts *every* BN layer of the module and, at teardown,
    turns them into ``torch.nn.modules.batchnorm._BatchNormXd`` layers (not your original classes). This callback
    converts only the layers you choose (e.g. a detection head trained on few samples per device, not a frozen
    backbone), builds from YAML beside the other techniques, and leaves the module exactly as it found it. Using both
    is refused (the Trainer flag would re-convert these layers).

    In a single process there is nothing to synchronise: the callback logs that at INFO level and changes nothing
    (the BN layers are still checked, so a wrong ``targets`` fails here as it would under DDP).

    Args:
        targets: which BN layers - paths, regular expressions matched in full, or layer types; default all.

    Example::

        trainer = L.Trainer(strategy="ddp", devices=4, callbacks=[SyncBatchNormConversion(targets=["head\\\\..*"])])

    Limits: ``nn.SyncBatchNorm`` synchronises CUDA / XPU tensors only - under DDP on CPU (gloo) it is refused at
    setup; refused under FSDP / DeepSpeed (sharded modules); the process group is the world.
    """

    takes_over: frozenset[str] = frozenset()
    conflicts_with: tuple[str, ...] = ("NormSwap",)

    def __init__(self, targets: list[str] | None = None) -> None:
        if targets is not None:
            targets = check_targets("targets", targets)
        self.targets = targets
        self.converted: list[str] = []
        self._originals: dict[str, _BatchNorm] = {}
        self._module: nn.Module | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        paths = [path for path, _ in batchnorm_layers(pl_module, self.targets)]
        if int(trainer.world_size) <= 1:
            _log.info("SyncBatchNormConversion: a single process has nothing to synchronise; %s left as they are.",
                      ", ".join(paths))
            return
        if compat.shards_parameters(trainer.strategy):
            raise ValueError(f"SyncBatchNormConversion does not support {type(trainer.strategy).__name__}.")
        if compat.layer_sync_enabled(trainer):
            raise ValueError("SyncBatchNormConversion with Trainer(sync_batchnorm=True): the Trainer already "
                             "converts every BatchNorm layer; use one of the two.")
        if trainer.strategy.root_device.type not in ("cuda", "xpu"):
            raise ValueError(f"SyncBatchNormConversion: torch's nn.SyncBatchNorm synchronises CUDA / XPU tensors "
                             f"only; this run is on {trainer.strategy.root_device.type!r}.")
        self._release()
        self._originals = convert_sync_batchnorm_(pl_module, paths)
        self._module = pl_module
        self.converted = list(self._originals)

    def _release(self) -> None:
        if self._module is not None and self._originals:
            revert_sync_batchnorm_(self._module, self._originals)
        self._originals, self._module = {}, None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._release()

    def state_dict(self) -> dict[str, Any]:
        return {"converted": list(self.converted)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the conversion follows from the arguments and the run
