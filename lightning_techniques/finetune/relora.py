"""ReLoRA (Lialin et al. 2023): LoRA whose factors are merged into the base weights and restarted every N steps.

Functional core (no Lightning): :func:`relora_restart` (merge ``B A`` into the base weight, re-initialise ``A`` and
zero ``B``), :func:`prune_optimizer_state` (the magnitude reset of the factors' optimizer state) and
:func:`relora_lr_factor` (the jagged cosine schedule with a re-warm-up after every restart).
Thin Lightning adapter: :class:`ReLoRA` (peft LoRA layers through :func:`~lightning_techniques.finetune.lora.apply_lora`).

The restart itself is written here: peft has no ReLoRA; ``merge_and_unload`` would remove the adapters, and
``LoraLayer.merge`` keeps them but marks the layer merged (a later unmerge subtracts the delta again).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_number, check_positive
from lightning_techniques.finetune._peft import adapter_parameter_names, outside_tuner_layers
from lightning_techniques.finetune._trainable import FinetuneSession, check_targets, resolve_targets
from lightning_techniques.finetune.adapters import other_methods
from lightning_techniques.finetune.lora import apply_lora


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(path, layer)`` of every peft LoRA layer in ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@torch.no_grad()
def relora_restart(model: nn.Module, generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Merge every peft LoRA adapter's update ``scaling * B A`` into its base layer's weight, then re-initialise
    the factors as LoRA does at the start (``A`` Kaiming-uniform with ``a=sqrt(5)``, drawn from ``generator``; ``B``
    zero), so the model's function is unchanged and the next cycle learns a new low-rank update. Returns the
    re-initialised factor parameters (whose optimizer state :func:`prune_optimizer_state` then resets)."""
    reset: list[nn.Parameter] = []
    layer: Any
    for path, layer in lora_layers(model):
        if getattr(layer, "merged_adapters", []):
            raise ValueError(f"relora_restart: {path} holds merged peft adapters; unmerge them first.")
        base = layer.get_base_layer()
        for name in list(layer.lora_A.keys()):
            if getattr(layer, "use_dora", {}).get(name, False):
                raise ValueError(f"relora_restart: {path} uses DoRA, which ReLoRA does not support.")
            delta = layer.get_delta_weight(name)
            base.weight.data += delta.to(base.weight.dtype)
            a_weight, b_weight = layer.lora_A[name].weight, layer.lora_B[name].weight
            fresh = torch.empty(a_weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a_weight.copy_(fresh.to(a_weight.dtype))
            b_weight.zero_()
            reset += [a_weight, b_weight]
            for factor in (layer.lora_A[name], layer.lora_B[name]):
                if getattr(factor, "bias", None) is not None:
                    factor.bias.zero_()
                    reset.append(factor.bias)
    return reset


@torch.no_grad()
def prune_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], mode: str = "magnitude",
                          ratio: float = 0.99) -> int:
    """Reset the optimizer state of ``params`` after a restart (Lialin et al. 2023, sec. 3): ``"magnitude"`` zeroes
    the ``ratio`` fraction of smallest-magnitude entries of the state tensors shaped like their parameter (Adam's
    moments, momentum buffers) and keeps the rest; ``"zero"`` zeroes them all; ``"keep"`` leaves them. Step counters
    are kept. Returns the number of state tensors changed.

    One mask per parameter, chosen by the magnitude of its first moment (``exp_avg``, else ``momentum_buffer``, else
    its first such tensor), applied to all of its state tensors: pruning Adam's two moments independently leaves
    entries with ``exp_avg != 0`` but ``exp_avg_sq == 0``, whose next update is ``exp_avg / eps`` - and right after a
    restart ``A`` gets no gradient at all (``B = 0``), so nothing refills ``exp_avg_sq`` and the factor explodes."""
    check_choice("mode", mode, ["magnitude", "zero", "keep"])
    check_number("ratio", ratio, low=0.0, high=1.0)
    if mode == "keep":
        return 0
    changed = 0
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        tensors = {k: v for k, v in state.items()
                   if torch.is_tensor(v) and v.shape == param.shape and v.numel() > 0}
        if not tensors:
            continue
        if mode == "zero" or ratio >= 1.0:
            for value in tensors.values():
                value.zero_()
        elif ratio > 0.0:
            score = next((tensors[k] for k in ("exp_avg", "momentum_buffer") if k in tensors),
                         next(iter(tensors.values()))).abs()
            k = int(ratio * score.numel())  # entries to zero
            if k > 0:
                drop = score <= score.flatten().kthvalue(k).values
                for value in tensors.values():
                    value.masked_fill_(drop, 0.0)
        changed += len(tensors)
    return changed


def relora_lr_factor(step: int, total_steps: int, restart_every: int, warmup_steps: int = 0, rewarm_steps: int = 0,
                     min_ratio: float = 0.0) -> float:
    """The jagged cosine LR multiplier of ReLoRA at optimizer step ``step`` (0-based).

    A cosine decay from 1 to ``min_ratio`` over ``total_steps`` after a linear warm-up of ``warmup_steps``; after
    every restart (steps ``restart_every``, ``2 restart_every``, ...) a linear re-warm-up over ``rewarm_steps``: the
    ``j``-th step of a cycle (``j = 0, 1, ...``) gets ``(j + 1) / (rewarm_steps + 1)`` of the cosine value.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    value = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if restart_every > 0 and step >= restart_every:
        j = step % restart_every
        if j < rewarm_steps:
            value *= (j + 1) / (rewarm_steps + 1)
    return value


def numerical_rank(matrix: torch.Tensor, rtol: float = 1e-3) -> int:
    """The number of singular values of ``matrix`` above ``rtol`` times the largest (for update-rank checks)."""
    values = torch.linalg.svdvals(matrix.detach().double())
    if values.numel() == 0 or values[0] == 0:
        return 0
    return int((values > rtol * values[0]).sum())


#: the other callbacks that set the run's LR (refused beside the jagged schedule)
_LR_OWNERS = ("LRSchedule", "ReduceLROnPlateau", "StochasticWeightAveraging")


class ReLoRA(LeanHooks, FinetuneSession, Callback):
    """ReLoRA (Lialin et al. 2023): LoRA on the chosen layers whose factors are merged into the frozen base weights
    and restarted every ``restart_every`` optimizer steps, with the factors' optimizer state pruned and a jagged
    cosine LR schedule, so a sequence of low-rank updates adds up to a high-rank one.

    Lialin, Shivagunde, Muckatira & Rumshisky, "ReLoRA: High-Rank Training Through Low-Rank Updates", ICLR 2024
    (arXiv 2023). At the start of the first batch after optimizer step ``k * restart_every``: ``W += scaling * B A``
    for every LoRA layer, ``A`` re-drawn (Kaiming-uniform, from a generator seeded by ``seed`` and ``k``: every DDP
    rank and a resumed run draw the same), ``B = 0`` (the model's function is unchanged), and the factors'
    optimizer state reset (:func:`prune_optimizer_state`: by default the 99 % smallest-magnitude entries zeroed).
    ``lr_schedule="jagged_cosine"`` multiplies the optimizer's LR by :func:`relora_lr_factor` (warm-up, cosine decay,
    a linear re-warm-up of ``rewarm_steps`` after every restart) through a ``LambdaLR`` added to whatever
    ``configure_optimizers`` returns; it takes over the LR, so :class:`~lightning_techniques.LRSchedule` is refused
    (use ``lr_schedule="none"`` to combine them).

    The restart happens at a batch *start*, so a checkpoint written at the end of step ``k * restart_every`` holds the
    pre-restart weights and the count of restarts done, and the resumed run restarts at the same point: exact
    resume across a restart. After ``fit`` the module keeps its LoRA layers (the declared change,
    :attr:`changed_paths`; the merged updates are in their base weights); other parameters get their
    ``requires_grad`` back.

    Args:
        targets: layers to adapt: names, regular expressions (full match) or layer types (peft LoRA layer types).
        r: LoRA rank (``> 0``).
        alpha: LoRA scaling numerator (``scaling = alpha / r``).
        dropout: dropout on the adapter input.
        restart_every: optimizer steps between restarts (``> 0``).
        optimizer_reset: ``"magnitude"`` (zero the ``reset_ratio`` smallest entries), ``"zero"`` or ``"keep"``.
        reset_ratio: fraction of the factors' optimizer-state entries zeroed by the magnitude reset.
        lr_schedule: ``"jagged_cosine"`` or ``"none"`` (the LR is left to the run).
        warmup_steps: initial linear warm-up steps of the jagged schedule.
        rewarm_steps: re-warm-up steps after each restart (``< restart_every``).
        min_lr_ratio: the cosine's final LR as a fraction of the optimizer's LR.
        total_steps: length of the cosine (``None``: ``trainer.estimated_stepping_batches``).
        train_also: names / regular expressions of submodules that train too (e.g. ``["head"]``).
        seed: seed of the factors' re-initialisations.

    Example::

        from lightning_techniques import ReLoRA
        relora = ReLoRA(targets=["net.0", "net.2"], r=4, restart_every=50, rewarm_steps=5, train_also=["net.4"])
        L.Trainer(max_steps=300, callbacks=[relora]).fit(TabularMLP(), datamodule=BreastCancerDataModule())

    Limits: automatic optimisation; plain LoRA (no DoRA); FSDP/DeepSpeed are not supported. A callback that
    changes weights at batch start must be ordered with care around ReLoRA's restart. One parameter-efficient method
    per run; refused beside ``L1Penalty`` / ``L2Penalty`` (they look their parameters up by name at fit start, and
    peft renames an adapted layer's weight to ``<layer>.base_layer.weight``) and, with the jagged schedule, beside
    the other callbacks that set the LR.
    """

    takes_over = frozenset({"configure_optimizers", "lr"})
    # the weight penalties look their parameters up by name at fit start; peft moves an adapted layer's weight to
    # `<layer>.base_layer.weight` in setup, so the pair is refused rather than failing at the first step
    conflicts_with: tuple[str, ...] = (*other_methods("ReLoRA"), "L1Penalty", "L2Penalty",
                                       *_LR_OWNERS)  # (the LR owners: not with lr_schedule="none")
    changes_module = True

    def __init__(self, targets: Sequence[str] | str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 restart_every: int = 100, optimizer_reset: Literal["magnitude", "zero", "keep"] = "magnitude",
                 reset_ratio: float = 0.99, lr_schedule: Literal["jagged_cosine", "none"] = "jagged_cosine",
                 warmup_steps: int = 0, rewarm_steps: int = 0, min_lr_ratio: float = 0.1,
                 total_steps: int | None = None, train_also: Sequence[str] = (), seed: int = 0) -> None:
        require("peft", "finetune", "ReLoRA")
        self.targets = check_targets("targets", targets)
        self.r = check_positive("r", r, integer=True)
        self.alpha = check_positive("alpha", alpha)
        self.dropout = check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.restart_every = check_positive("restart_every", restart_every, integer=True)
        self.optimizer_reset = check_choice("optimizer_reset", optimizer_reset, ["magnitude", "zero", "keep"])
        self.reset_ratio = check_number("reset_ratio", reset_ratio, low=0.0, high=1.0)
        self.lr_schedule = check_choice("lr_schedule", lr_schedule, ["jagged_cosine", "none"])
        self.warmup_steps = check_non_negative("warmup_steps", warmup_steps, integer=True)
        self.rewarm_steps = check_non_negative("rewarm_steps", rewarm_steps, integer=True)
        if rewarm_steps >= restart_every:
            raise ValueError(f"rewarm_steps={rewarm_steps} must be below restart_every={restart_every}.")
        self.min_lr_ratio = check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
        if total_steps is not None:
            check_positive("total_steps", total_steps, integer=True)
        self.total_steps = total_steps
        self.train_also = check_targets("train_also", train_also, allow_empty=True)
        self.seed = check_number("seed", seed, integer=True)
        if lr_schedule == "none":  # the instance then leaves the LR (and LRSchedule & co.) alone
            self.takes_over = frozenset({"configure_optimizers"})
            self.conflicts_with = tuple(name for name in type(self).conflicts_with if name not in _LR_OWNERS)
        self.restarts = 0
        self.resolved_total_steps: int | None = None
        self._restored_total_steps: int | None = None
        self._changed: tuple[str, ...] = ()
        self._registered: Any = None

    @property
    def changed_paths(self) -> tuple[str, ...]:
        """The LoRA layers' paths (empty before setup)."""
        return self._changed

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if stage in ("validate", "test", "predict") and not self._changed and not lora_layers(pl_module):
                # a fresh module evaluated from an adapted checkpoint (trainer.test(module, ckpt_path=...))
                self._changed = tuple(apply_lora(pl_module, self.targets, "lora", self.r, self.alpha, self.dropout))
            return
        check_conflicts(trainer, self)
        if not pl_module.automatic_optimization:
            raise ValueError("ReLoRA needs automatic optimisation (it restarts the factors between optimizer steps).")
        extra = resolve_targets(outside_tuner_layers(pl_module), self.train_also, "train_also") if self.train_also else []
        self._begin(pl_module)
        try:
            paths = apply_lora(pl_module, self.targets, "lora", self.r, self.alpha, self.dropout)
        except Exception:
            self._end()
            raise
        self._changed = tuple(paths)
        self._train_only(pl_module, adapter_parameter_names(pl_module, paths) + list(extra))
        if self.lr_schedule == "jagged_cosine":
            from lightning_techniques.optim._configure import register_scheduler_provider

            register_scheduler_provider(pl_module, self, self._provide)
            self._registered = pl_module

    def factor(self, step: int) -> float:
        """The LR multiplier of the jagged schedule at optimizer step ``step`` (after the length is resolved)."""
        assert self.resolved_total_steps is not None, "the schedule length is resolved when fit configures optimizers"
        return relora_lr_factor(step, self.resolved_total_steps, self.restart_every, self.warmup_steps,
                                self.rewarm_steps, self.min_lr_ratio)

    def _provide(self, module: nn.Module, optimizers: list) -> list[dict[str, Any]]:
        trainer: Any = module.trainer
        # explicit length, else the one a resumed run's checkpoint holds, else the Trainer's estimate
        self.resolved_total_steps = (self.total_steps or self._restored_total_steps
                                     or int(trainer.estimated_stepping_batches))

        def factor(step: int) -> float:  # a plain function: LambdaLR keeps none of it in its state dict
            return self.factor(step)

        return [{"scheduler": LambdaLR(opt, factor), "interval": "step", "frequency": 1, "name": "ReLoRA-jagged"}
                for opt in optimizers]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        due = trainer.global_step // self.restart_every
        while self.restarts < due:  # (one restart per boundary; a resumed run catches up the same way)
            self.restarts += 1
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.restarts)
            params = relora_restart(pl_module, generator)
            for optimizer in trainer.optimizers:
                prune_optimizer_state(optimizer, params, self.optimizer_reset, self.reset_ratio)

    def _close(self) -> None:
        if self._registered is not None:
            from lightning_techniques.optim._configure import unregister

            unregister(self._registered, self)
            self._registered = None
        self._end()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "changed_paths": list(self._changed),
                "resolved_total_steps": self.resolved_total_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restarts = int(state_dict.get("restarts", 0))
        self._restored_total_steps = state_dict.get("resolved_total_steps")
