"""DDP script for the optim_sched group: OptimizerCallback (AdamW groups, L-BFGS, ASGD, SparseAdam), LRSchedule and
ReduceLROnPlateau under strategy="ddp", accelerator="cpu", devices=2. Each rank saves what it observed."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch
from torch import nn

from lightning_techniques.demo import ClassifierModule, DeepMLP, DigitsDataModule
from lightning_techniques.optim.optimizers import OptimizerCallback, asgd_averages
from lightning_techniques.optim.schedules import LRSchedule, ReduceLROnPlateau
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def trainer(callbacks, **kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                deterministic=True)
    base.update(kwargs)
    return L.Trainer(callbacks=callbacks, **base)


class LRRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


class EpochLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class RankMetric(DeepMLP):
    """Logs, WITHOUT sync_dist, a metric that never improves on rank 0 and improves every epoch on rank 1."""

    def on_validation_epoch_end(self) -> None:
        value = 1.0 if self.global_rank == 0 else -float(self.current_epoch)
        self.log("rank_metric", value, sync_dist=False)


class BagOfPixels(ClassifierModule):
    """Digits as a bag of (position, grey level) tokens: sparse EmbeddingBag + dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(64 * 17, 8, mode="mean", sparse=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.embed((x.flatten(1) * 16).round().long() + torch.arange(64) * 17))


class CountingMLP(DeepMLP):
    closure_calls = 0

    def training_step(self, batch, batch_idx):
        type(self).closure_calls += 1
        return super().training_step(batch, batch_idx)


def main() -> None:
    out = script_out_dir()
    result: dict = {}

    # 1. AdamW with decay groups + warm-up cosine schedule, composed in the "wrong" order
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    module = DeepMLP(depth=2, width=16)
    t = trainer([LRSchedule("cosine", warmup_steps=2), OptimizerCallback("adamw", lr=0.02, weight_decay=0.01),
                 recorder], max_steps=6)
    t.fit(module, datamodule=DigitsDataModule(batch_size=32))
    result["adamw_cosine_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result["adamw_cosine_lrs"] = recorder.lrs
    result["adamw_groups"] = [g["name"] for g in t.optimizers[0].param_groups]
    rank = t.global_rank

    # 2. ReduceLROnPlateau agrees on rank 0's value although ranks logged different metrics
    L.seed_everything(0, verbose=False)
    epoch_lr = EpochLR()
    module = RankMetric(depth=2, width=16, lr=0.1)
    t = trainer([ReduceLROnPlateau("rank_metric", patience=0, factor=0.5), epoch_lr], max_epochs=4,
                limit_train_batches=2, limit_val_batches=1)
    t.fit(module, datamodule=DigitsDataModule(batch_size=32))
    result["plateau_lrs"] = epoch_lr.lrs
    result["plateau_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    # 3. L-BFGS: several closure evaluations per step; the loss is averaged so both ranks take the same number
    L.seed_everything(0, verbose=False)
    CountingMLP.closure_calls = 0
    module = CountingMLP(depth=2, width=16)
    t = trainer([OptimizerCallback("lbfgs", lr=0.5, optimizer_kwargs={"max_iter": 4, "line_search_fn": "strong_wolfe"})],
                max_steps=3)
    t.fit(module, datamodule=DigitsDataModule(batch_size=32))
    result["lbfgs_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result["lbfgs_closure_calls"] = CountingMLP.closure_calls
    result["lbfgs_steps"] = t.global_step
    result["lbfgs_loss_agreed"] = t.optimizers[0].loss_reducer is not None
    result["lbfgs_finite"] = bool(torch.isfinite(t.callback_metrics["train_loss"]).all())  # per-rank value

    # 4. ASGD: validation runs with the averaged parameters on every rank
    L.seed_everything(0, verbose=False)
    seen: dict = {}

    class Probe(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            averages = asgd_averages(trainer.optimizers[0])
            seen["ok"] = bool(averages) and all(torch.equal(p, averages[p]) for p in pl_module.parameters())

    module = DeepMLP(depth=2, width=16)
    t = trainer([OptimizerCallback("asgd", lr=0.2, optimizer_kwargs={"t0": 2}), Probe()], max_epochs=1,
                limit_train_batches=5, limit_val_batches=1)
    t.fit(module, datamodule=DigitsDataModule(batch_size=32))
    result["asgd_eval_is_averaged"] = seen.get("ok", False)
    result["asgd_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    # 5. SparseAdam (sparse embedding gradients, all-reduced by DDP) + AdamW for the dense head
    L.seed_everything(0, verbose=False)
    module = BagOfPixels()
    t = trainer([OptimizerCallback("sparse_adam", lr=0.01)], max_steps=4)
    t.fit(module, datamodule=DigitsDataModule(batch_size=32))
    result["sparse_adam_weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result["sparse_adam_kinds"] = [type(o).__name__ for o in t.optimizers[0].optimizers]

    save_rank_result(out, rank, result)


if __name__ == "__main__":
    main()
