"""AdaLoRA (Zhang et al. 2023) through peft: ``update_and_allocate`` runs once per optimizer step with the gradients
present (also under gradient accumulation), the rank budget shrinks to ``target_r`` per layer, the orthogonality
term is peft's; bad input."""

from __future__ import annotations

from typing import Any

import lightning as L
import peft
import pytest
import torch

from lightning_techniques.demo import BreastCancerDataModule, TabularMLP
from lightning_techniques.finetune.adalora import AdaLoRA, apply_adalora, current_ranks, orthogonal_regularization


def _trainer(callbacks: list, **kwargs: Any) -> L.Trainer:
    base: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(callbacks=callbacks, **base)


class Recorder(L.Callback):
    """Wraps the AdaLoRA tuner's ``update_and_allocate`` (after setup) and records every call: the step it got, the
    Trainer's step, whether every adapter parameter had a gradient, and the ranks after the call."""

    def __init__(self, adalora: AdaLoRA) -> None:
        self.adalora = adalora
        self.calls: list[dict[str, Any]] = []
        self.batches = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tuner = self.adalora.tuner
        original = tuner.update_and_allocate

        def recorded(step: int) -> Any:
            grads = [p.grad for n, p in pl_module.named_parameters() if "lora_" in n]
            result = original(step)
            self.calls.append({"step": step, "global_step": trainer.global_step,
                               "grads": bool(grads) and all(g is not None and g.abs().sum() > 0 for g in grads[:1])
                               and all(g is not None for g in grads),
                               "budget": sum(current_ranks(pl_module).values())})
            return result

        tuner.update_and_allocate = recorded

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        del self.adalora.tuner.update_and_allocate  # the instance wrapper, for a clean object


def test_update_and_allocate_once_per_optimizer_step_with_gradients_under_accumulation() -> None:
    L.seed_everything(0, verbose=False)
    adalora = AdaLoRA(targets=["net.0", "net.2"], init_r=4, target_r=2, tinit=1, tfinal=1, total_steps=6,
                      orth_reg_weight=0.1, log=False)
    recorder = Recorder(adalora)
    trainer = _trainer([adalora, recorder], max_steps=6, accumulate_grad_batches=3)
    trainer.fit(TabularMLP(hidden=16), datamodule=BreastCancerDataModule(batch_size=16))
    assert recorder.batches == 18
    assert [c["step"] for c in recorder.calls] == list(range(6)), "once per optimizer step, peft's 0-based index"
    assert [c["global_step"] for c in recorder.calls] == list(range(1, 7)), "after the step"
    assert all(c["grads"] for c in recorder.calls), "gradients present (called before zero_grad)"
    assert adalora.allocation_calls == 6


def test_rank_budget_shrinks_to_target_r() -> None:
    L.seed_everything(0, verbose=False)
    adalora = AdaLoRA(targets=["net.0", "net.2", "net.4"], init_r=6, target_r=2, tinit=2, tfinal=3, delta_t=1,
                      total_steps=16, train_also=["net.4"])
    recorder = Recorder(adalora)
    module = TabularMLP(hidden=16)
    trainer = _trainer([adalora, recorder], max_steps=16)
    trainer.fit(module, datamodule=BreastCancerDataModule(batch_size=16))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    ranknum = [p for n, p in module.named_parameters() if "ranknum" in n]
    assert ranknum and not any(id(p) in optimized for p in ranknum), "peft's rank counter never trains (train_also)"
    assert all(float(p) == 6 for p in ranknum)
    budgets = [c["budget"] for c in recorder.calls]
    assert budgets[0] == 18, "the full budget during tinit"
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), budgets
    assert budgets[-1] == 6, f"target_r * layers at the end: {budgets}"
    assert sorted(current_ranks(module)) == ["net.0", "net.2", "net.4"]
    assert adalora.changed_paths == ("net.0", "net.2", "net.4")
    assert "peft_config" not in vars(module), "peft's config attribute is not left on the module"
    assert all(p.requires_grad for n, p in module.named_parameters() if "lora_" not in n and "ranknum" not in n), (
        "requires_grad restored")


def test_orthogonal_regularization_is_zero_for_orthonormal_factors() -> None:
    module = TabularMLP(hidden=8)
    adalora = AdaLoRA(targets=["net.0"], init_r=3, target_r=1, total_steps=10)
    config = peft.AdaLoraConfig(init_r=3, target_r=1, total_step=10, target_modules=["net.0"])
    apply_adalora(module, ["net.0"], config)
    layer = module.net[0]
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(30, 3))
        layer.lora_A["default"].copy_(q.T)  # rows orthonormal: A A^T = I
        q2, _ = torch.linalg.qr(torch.randn(8, 3))
        layer.lora_B["default"].copy_(q2)  # columns orthonormal: B^T B = I
    assert float(orthogonal_regularization(module)) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        layer.lora_A["default"].mul_(2.0)  # A A^T = 4 I: ||3 I||_F = 3 sqrt(3); mean over the two factors
    assert float(orthogonal_regularization(module)) == pytest.approx(3 * 3 ** 0.5 / 2, rel=1e-4)
    assert adalora.init_r == 3


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="init_r"):
        AdaLoRA(targets=["net.0"], init_r=0)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRA(targets=["net.0"], init_r=2, target_r=4)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRA(targets=["net.0"], init_r=2, target_r=0)
    with pytest.raises(ValueError, match="tinit"):
        AdaLoRA(targets=["net.0"], tinit=5, tfinal=5, total_steps=10)
    with pytest.raises(ValueError, match="delta_t"):
        AdaLoRA(targets=["net.0"], delta_t=0)
    module = TabularMLP(hidden=8)
    with pytest.raises(ValueError, match=r"nope.*net\.0"):
        _trainer([AdaLoRA(targets=["nope"])], max_steps=1).fit(module, datamodule=BreastCancerDataModule())
    assert all(p.requires_grad for p in module.parameters()) and not current_ranks(module), "nothing half-applied"
    with pytest.raises(ValueError, match="tinit"):  # the run's length is known at train start, before any step
        _trainer([AdaLoRA(targets=["net.0"], tinit=3, tfinal=3)], max_steps=4).fit(
            TabularMLP(hidden=8), datamodule=BreastCancerDataModule())
