"""AdaLoRA (Zhang et al. 2023) on a stock Trainer: peft's ``AdaLoraModel`` with importance-based rank allocation.

Functional core: :func:`apply_adalora` (peft's SVD-form adapters ``P diag(E) Q`` on the targets, without attaching
anything but the adapters to the module), :func:`orthogonal_regularization` (the paper's ``||P^T P - I||_F +
||Q Q^T - I||_F`` term, as peft's ``AdaLoraModel.forward`` computes it), :func:`current_ranks` (the ranks left after
masking).
Thin Lightning adapter: :class:`AdaLoRA`.

When ``update_and_allocate`` runs: peft's documented loop is ``loss.backward(); optimizer.step();
update_and_allocate(step); optimizer.zero_grad()`` - after the step, with the gradients still present (the
importance is ``|w * grad|``, and in the final phase the rank masks are re-applied after the step so they stick).
In Lightning's automatic optimisation (``loops/optimization/automatic.py``) ``zero_grad`` (and
``on_before_zero_grad``) run inside the closure *before* the backward of the first micro-batch of the next step, so
the gradients of a step are still there in ``on_train_batch_end`` of the batch that stepped; under gradient
accumulation the batches that do not step leave ``global_step`` unchanged. So :class:`AdaLoRA` calls it in
``on_train_batch_end`` exactly when ``trainer.global_step`` advanced - once per optimizer step, also under
accumulation - with peft's 0-based step index (``global_step - 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.loss_terms import add_loss_term
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.step_logging import log_step_metrics, resolve_log_flag
from lightning_techniques._internal.validation import check_non_negative, check_number, check_positive
from lightning_techniques.finetune._trainable import FinetuneSession, check_targets, resolve_targets
from lightning_techniques.finetune.adapters import other_methods

ADAPTER = "default"


def apply_adalora(model: nn.Module, target_modules: Sequence[str], config: Any) -> Any:
    """Put peft's AdaLoRA ``SVDLinear`` layers on ``target_modules`` (full ``named_modules()`` paths) of ``model``
    and return the ``AdaLoraModel`` tuner (it holds the rank allocator; call its ``update_and_allocate``).

    peft's tuner also sets ``model.peft_config``; that attribute is removed again (the tuner keeps the config), so
    only the adapted layers change on ``model``. peft freezes every non-adapter parameter."""
    require("peft", "finetune", "AdaLoRA")
    from peft.tuners.adalora import AdaLoraModel

    had_config = "peft_config" in vars(model)
    config.target_modules = list(target_modules)
    tuner = AdaLoraModel(model, config, ADAPTER)
    if not had_config:
        vars(model).pop("peft_config", None)
    return tuner


def orthogonal_regularization(model: nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """Mean over AdaLoRA factors of ``||A A^T - I||_F`` (``lora_A``) and ``||B^T B - I||_F`` (``lora_B``), the
    regulariser of peft's ``AdaLoraModel.forward`` (Zhang et al. 2023, eq. 4)."""
    terms = []
    for name, param in model.named_parameters():
        if f"lora_A.{adapter}" in name or f"lora_B.{adapter}" in name:
            cov = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def current_ranks(model: nn.Module, adapter: str = ADAPTER) -> dict[str, int]:
    """``{layer path: number of non-zero singular values E}`` of every AdaLoRA layer (its current rank)."""
    ranks = {}
    for name, param in model.named_parameters():
        if name.endswith(f"lora_E.{adapter}"):
            ranks[name[: -len(f".lora_E.{adapter}")]] = int((param.detach() != 0).sum())
    return ranks


class AdaLoRA(LeanHooks, FinetuneSession, Callback):
    """AdaLoRA (Zhang et al. 2023): SVD-form LoRA adapters whose total rank budget shrinks from ``init_r`` to
    ``target_r`` per layer on average, pruning the least important singular values; through peft's ``AdaLoraModel``.

    Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen & Zhao, "AdaLoRA: Adaptive Budget Allocation for
    Parameter-Efficient Fine-Tuning", ICLR 2023. Importance of each triplet is the smoothed sensitivity
    ``|w * grad|`` times its uncertainty; the budget follows a cubic schedule: ``tinit`` warm-up steps at the full
    budget, a decrease until ``total_steps - tfinal`` (masks updated every ``delta_t`` steps), then the final
    allocation is fixed for ``tfinal`` steps. ``orth_reg_weight * ||P^T P - I|| ...`` is added to the training loss
    (the loss-term mechanism; peft adds it only to a transformers model's ``outputs.loss``).

    ``update_and_allocate`` is called once per optimizer step, after the step with the gradients still present
    (peft's documented order; see this module's docstring for Lightning's hook order): also under
    ``accumulate_grad_batches``. Its state (importance averages, rank pattern) is checkpointed: exact resume. After
    ``fit`` the module keeps the AdaLoRA layers (:attr:`changed_paths`); other parameters get their
    ``requires_grad`` back.

    Args:
        targets: layers to adapt (``nn.Linear``): names, regular expressions (full match) or layer types; a target
            matching nothing is refused at setup with the list of layers that exist.
        init_r: initial rank per layer (``> 0``).
        target_r: average final rank per layer (``0 < target_r <= init_r``).
        alpha: LoRA scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        tinit: warm-up steps at the full budget.
        tfinal: final steps with the allocation fixed.
        delta_t: steps between budget re-allocations.
        beta1, beta2: smoothing of sensitivity and uncertainty (in ``(0, 1)``).
        orth_reg_weight: weight of the orthogonality regulariser (0: none).
        total_steps: the run's optimizer steps (``None``: ``trainer.estimated_stepping_batches`` at train start).
        train_also: names / regular expressions of submodules that train too (e.g. ``["head"]``).
        log: log ``adalora/budget`` (sum of current ranks) at the ``log_every_n_steps`` cadence and the
            orthogonality term (``loss_terms/adalora_orth``) (not passed: ``True``; ``False``: log nothing).
        log_ranks: deprecated old name of ``log`` (a ``FutureWarning``; both together: ``ValueError``).

    Example::

        from lightning_techniques import AdaLoRA
        adalora = AdaLoRA(targets=["net.0", "net.2"], init_r=8, target_r=2, tinit=10, tfinal=10, total_steps=200,
                          train_also=["net.4"])
        L.Trainer(max_steps=200, callbacks=[adalora]).fit(TabularMLP(), datamodule=BreastCancerDataModule())

    Limits: ``nn.Linear`` targets (peft's AdaLoRA layers); automatic optimisation; one optimizer. FSDP/DeepSpeed
    are not supported. ``update_and_allocate`` runs in ``on_train_batch_end``: a callback that saves checkpoints there
    must come after AdaLoRA in ``callbacks`` (Lightning's ``ModelCheckpoint`` always runs last). One
    parameter-efficient method per run; refused beside ``L1Penalty`` / ``L2Penalty`` (see :class:`ReLoRA`).
    """

    takes_over = frozenset({"configure_optimizers", "loss_term"})
    # the weight penalties look their parameters up by name at fit start; peft moves an adapted layer's weight to
    # `<layer>.base_layer.weight` in setup, so the pair is refused rather than failing at the first step
    conflicts_with: tuple[str, ...] = (*other_methods("AdaLoRA"), "L1Penalty", "L2Penalty")
    changes_module = True

    def __init__(self, targets: Sequence[str] | str, init_r: int = 12, target_r: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, tinit: int = 0, tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85,
                 beta2: float = 0.85, orth_reg_weight: float = 0.5, total_steps: int | None = None,
                 train_also: Sequence[str] = (), log: bool | None = None, log_ranks: bool | None = None) -> None:
        require("peft", "finetune", "AdaLoRA")
        log_enabled = resolve_log_flag("AdaLoRA", log, log_ranks=log_ranks)
        self.targets = check_targets("targets", targets)
        self.init_r = check_positive("init_r", init_r, integer=True)
        self.target_r = check_positive("target_r", target_r, integer=True)
        if target_r > init_r:
            raise ValueError(f"target_r={target_r} must not exceed init_r={init_r}.")
        self.alpha = check_positive("alpha", alpha)
        self.dropout = check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.tinit = check_non_negative("tinit", tinit, integer=True)
        self.tfinal = check_non_negative("tfinal", tfinal, integer=True)
        self.delta_t = check_positive("delta_t", delta_t, integer=True)
        self.beta1 = check_number("beta1", beta1, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.beta2 = check_number("beta2", beta2, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.orth_reg_weight = check_non_negative("orth_reg_weight", orth_reg_weight)
        if total_steps is not None:
            check_positive("total_steps", total_steps, integer=True)
            self._check_phases(total_steps)
        self.total_steps = total_steps
        self.train_also = check_targets("train_also", train_also, allow_empty=True)
        self._log_enabled = log_enabled  # not ``self.log``: Lightning assigns that before setup
        self.tuner: Any = None
        self.allocation_calls = 0
        self._changed: tuple[str, ...] = ()
        self._loss_term: Any = None
        self._step_at_batch_start = -1
        self._pending_state: dict[str, Any] | None = None

    def _check_phases(self, total: int) -> None:
        if self.tinit + self.tfinal >= total:
            raise ValueError(f"AdaLoRA: tinit ({self.tinit}) + tfinal ({self.tfinal}) must be below the run's "
                             f"{total} optimizer steps, leaving steps for the budget to shrink.")

    @property
    def changed_paths(self) -> tuple[str, ...]:
        """The adapted layers' paths (empty before setup)."""
        return self._changed

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if stage in ("validate", "test", "predict") and not self._changed and not current_ranks(pl_module):
                # a fresh module evaluated from an adapted checkpoint (trainer.test(module, ckpt_path=...))
                paths = resolve_targets(pl_module, self.targets, "targets", types=(nn.Linear,))
                self._begin(pl_module)
                apply_adalora(pl_module, paths, self._config(paths))
                self._end()  # (peft's freezing undone)
                self._changed = tuple(paths)
            return
        check_conflicts(trainer, self)
        if not pl_module.automatic_optimization:
            raise ValueError("AdaLoRA needs automatic optimisation (it updates the ranks after each optimizer step).")
        paths = resolve_targets(pl_module, self.targets, "targets", types=(nn.Linear,))
        extra = resolve_targets(pl_module, self.train_also, "train_also") if self.train_also else []
        config = self._config(paths)
        self._begin(pl_module)
        self.tuner = apply_adalora(pl_module, paths, config)
        self._changed = tuple(paths)
        self._train_only(pl_module, [n for n, _ in pl_module.named_parameters() if "lora_" in n] + list(extra))
        for name, param in pl_module.named_parameters():  # peft's rank counter is a frozen Parameter: never trained,
            if ".ranknum." in f".{name}":                   # also when train_also names an adapted layer
                param.requires_grad_(False)
        if self.orth_reg_weight > 0:
            weight = self.orth_reg_weight
            self._loss_term = add_loss_term(
                pl_module, "adalora_orth", lambda module, batch, batch_idx, loss: weight * orthogonal_regularization(
                    module).to(loss.device), log=self._log_enabled)

    def _config(self, paths: list[str]) -> Any:
        peft = require("peft", "finetune", "AdaLoRA")
        placeholder = self.total_steps or self.tinit + self.tfinal + 1  # set to the run's length at train start
        return peft.AdaLoraConfig(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            tinit=self.tinit, tfinal=self.tfinal, deltaT=self.delta_t, beta1=self.beta1, beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight, total_step=placeholder, target_modules=list(paths),
        )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.tuner is not None and len(trainer.optimizers) != 1:
            raise ValueError(f"AdaLoRA supports one optimizer, the run has {len(trainer.optimizers)}.")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.tuner is None:
            return
        total = self.total_steps or int(trainer.estimated_stepping_batches)
        self._check_phases(total)
        self.tuner.rankallocator.set_total_step(total)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tuner is None or trainer.global_step == self._step_at_batch_start:
            return  # a batch that only accumulated gradients
        self.tuner.update_and_allocate(trainer.global_step - 1)
        self.allocation_calls += 1
        if self._log_enabled:
            log_step_metrics(pl_module, lambda: {"adalora/budget": float(sum(current_ranks(pl_module).values()))})

    def _close(self, pl_module: Any) -> None:
        if self._loss_term is not None:
            self._loss_term.remove()
            self._loss_term = None
        self._end()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.tuner is None:
            return {"allocation_calls": self.allocation_calls}
        allocator = self.tuner.rankallocator
        config = self.tuner.peft_config[ADAPTER]
        pattern = config.rank_pattern or {}
        return {
            "allocation_calls": self.allocation_calls,
            "changed_paths": list(self._changed),
            "ipt": {k: v.detach().cpu().clone() for k, v in allocator.ipt.items()},
            "exp_avg_ipt": {k: v.detach().cpu().clone() for k, v in allocator.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.detach().cpu().clone() for k, v in allocator.exp_avg_unc.items()},
            "rank_pattern": {k: [bool(b) for b in (v.tolist() if torch.is_tensor(v) else v)]
                             for k, v in pattern.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.allocation_calls = int(state_dict.get("allocation_calls", 0))
        if "ipt" not in state_dict:
            return
        if self.tuner is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        allocator = self.tuner.rankallocator
        params = dict(self.tuner.model.named_parameters())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {k: v.to(params[k].device, params[k].dtype) if k in params else v
                                     for k, v in state[key].items()})
        self.tuner.peft_config[ADAPTER].rank_pattern = dict(state["rank_pattern"]) or None
