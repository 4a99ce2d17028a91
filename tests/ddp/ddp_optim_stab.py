"""DDP run (2 CPU processes, gloo) for the optim_stab group: NonFiniteGuard (+ SmartMixedPrecision bf16), AGC and
AutoClip, AccumulationScheduler (straight and resumed mid-epoch).

Launched by tests/test_optim_accumulation.py as ``python ddp_optim_stab.py --out DIR``; Lightning re-launches it
for rank 1. Each rank saves what it observed; the test checks the ranks agree and the numbers are right.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import (
    AccumulationScheduler,
    AdaptiveGradientClipping,
    AutoClip,
    NonFiniteGuard,
    SmartMixedPrecision,
)
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.regularization.early_stopping import snapshot_state
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class PoisonOnRank(Callback):
    """NaN inputs on one rank only, at one global batch index; snapshot the weights around that batch."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            if trainer.global_rank == self.rank:
                batch[0].fill_(float("nan"))
            self.before = snapshot_state(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            self.after = snapshot_state(pl_module)


class MicroBatchProbe(Callback):
    """Per micro-batch: did Lightning accumulate (no step), and the gradient norm right after backward (local under
    ``no_sync``, all-reduced on the stepping micro-batch). Per step: the number of micro-batches."""

    def __init__(self) -> None:
        self.micro: list[list[float]] = []  # [accumulating (0/1), grad norm]
        self.steps: list[int] = []
        self._count = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._count += 1

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.parameters()
                                                     if p.grad is not None]))
        self.micro.append([float(trainer.fit_loop._should_accumulate()), float(norm)])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append(self._count)
        self._count = 0


class SaveAt(Callback):
    def __init__(self, step: int, path: str) -> None:
        self.step, self.path, self.saved = step, path, False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.saved:  # first batch end at that step: a boundary
            trainer.save_checkpoint(self.path)
            self.saved = True


def trainer(out: Any, name: str, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    base = dict(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                deterministic=True, default_root_dir=str(out / name), callbacks=callbacks)
    base.update(kwargs)
    return L.Trainer(**base)


def main() -> None:
    out = script_out_dir()
    torch.set_num_threads(1)
    result: dict[str, Any] = {}

    # 1. NonFiniteGuard under bf16-mixed: a NaN on rank 1 only skips the step on both ranks
    L.seed_everything(0, verbose=False)
    poison, guard = PoisonOnRank(rank=1, batch=2), NonFiniteGuard(max_consecutive_skips=3)
    plugin = SmartMixedPrecision("bf16-mixed", device="cpu", fp32_modules=["head"])
    model = DigitsCNN(channels=8)
    t = trainer(out, "guard", [poison, guard], max_steps=5, plugins=[plugin])
    t.fit(model, datamodule=DigitsDataModule(batch_size=32))
    rank = t.global_rank
    result["guard_skipped_steps"] = list(guard.skipped_steps)
    result["guard_weights_unchanged"] = all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before)
    result["guard_weights"] = snapshot_state(model)
    result["guard_precision"] = t.precision
    result["guard_finite"] = all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())

    # 2. AGC + AutoClip on the all-reduced gradients
    L.seed_everything(0, verbose=False)
    agc, auto = AdaptiveGradientClipping(clipping=0.02), AutoClip(percentile=30)
    model = DigitsCNN(channels=8)
    t = trainer(out, "clip", [agc, auto], max_steps=6)
    t.fit(model, datamodule=DigitsDataModule(batch_size=32))
    result["autoclip_history"] = torch.tensor(auto.history, dtype=torch.float64)
    result["agc_clipped_steps"] = agc.clipped_steps
    result["autoclip_clipped_steps"] = auto.clipped_steps
    result["clip_weights"] = snapshot_state(model)

    # 3. AccumulationScheduler by step: straight, and resumed from a checkpoint at the end of epoch 0 (under DDP the
    #    demo loader cannot resume mid-epoch: Lightning wraps its sampler in a DistributedSamplerWrapper, which has
    #    no ``resume_at``; single-process mid-epoch resume is tested in test_optim_accumulation.py)
    def accumulation_run(max_steps: int, name: str, save: str | None = None, ckpt: str | None = None) -> Any:
        L.seed_everything(0, verbose=False)
        acc, probe = AccumulationScheduler({0: 1, 2: 2, 4: 4}, unit="step"), MicroBatchProbe()
        callbacks: list[Callback] = [acc, probe] + ([SaveAt(6, save)] if save else [])
        model = DigitsCNN(channels=8)
        t = trainer(out, name, callbacks, max_steps=max_steps, max_epochs=3, limit_train_batches=12)
        t.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt, weights_only=True if ckpt else None)
        return t, acc, probe, model

    t, acc, probe, model = accumulation_run(8, "acc_straight")
    plan = acc.plan(t)
    result["acc_plan"] = [p.micro_batches for p in plan]
    result["acc_steps"] = list(probe.steps)
    result["acc_total"] = acc.total_optimizer_steps(t)
    result["acc_global_step"] = t.global_step
    result["acc_micro"] = torch.tensor(probe.micro, dtype=torch.float64)
    result["acc_switches"] = [[s["step"], s["batch"], s["factor"]] for s in acc.switches]
    result["acc_weights"] = snapshot_state(model)
    ckpt = str(out / "acc_half.ckpt")
    accumulation_run(6, "acc_half", save=ckpt)
    t, acc, probe, model = accumulation_run(8, "acc_resumed", ckpt=ckpt)
    result["acc_resumed_weights"] = snapshot_state(model)
    result["acc_resumed_switches"] = [[s["step"], s["batch"], s["factor"]] for s in acc.switches]
    result["acc_resumed_steps"] = list(probe.steps)

    result["finished"] = True
    save_rank_result(out, rank, result)


if __name__ == "__main__":
    main()
