"""OptimizerCallback and its functional core: every optimizer by name, decay groups, L-BFGS, SparseAdam, ASGD."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from lightning_techniques.demo import ClassifierModule, DeepMLP, DigitsDataModule, TinyTransformer
from lightning_techniques.optim.optimizers import (
    OPTIMIZERS,
    CombinedOptimizer,
    DistributedLBFGS,
    OptimizerCallback,
    asgd_averages,
    build_optimizer,
    decay_param_groups,
    no_decay_parameter_names,
    sparse_parameter_names,
)
from lightning_techniques.testing import assert_exact_resume


class PixelEmbeddingNet(ClassifierModule):
    """Digits as a bag of (position, grey level) tokens: a sparse EmbeddingBag + a dense linear head."""

    def __init__(self, dim: int = 16, lr: float = 1e-2) -> None:
        super().__init__(lr=lr)
        self.embed = nn.EmbeddingBag(64 * 17, dim, mode="mean", sparse=True)
        self.head = nn.Linear(dim, 10)
        self.register_buffer("offsets", torch.arange(64) * 17, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x.flatten(1) * 16).round().long().clamp(0, 16) + self.offsets
        return self.head(self.embed(tokens))


def small_mlp(**kwargs):
    return DeepMLP(depth=2, width=32, **kwargs)


def quiet(**kwargs):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return base


def eval_loss(module: nn.Module, dm: DigitsDataModule) -> float:
    x, y = dm.train_dataset.inputs[:256], dm.train_dataset.targets[:256]
    with torch.no_grad():
        return float(nn.functional.cross_entropy(module(x), y))


# ---------------------------------------------------------------- functional core

def test_decay_groups_exclude_biases_and_norm_weights() -> None:
    model = TinyTransformer()
    groups = decay_param_groups(model, 0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    keep = {names[id(p)] for p in groups[1]["params"]}
    assert "blocks.0.attn.q_proj.weight" in decay and "pos" in decay and "head.weight" in decay
    assert {"blocks.0.attn.q_proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "norm.weight"} <= keep
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert len(decay) + len(keep) == len(list(model.parameters()))
    # extra pattern, switch-off, frozen parameters
    assert "pos" in no_decay_parameter_names(model, ["pos"])
    assert len(decay_param_groups(model, 0.1, decay_norm_and_bias=True)) == 1
    model.head.weight.requires_grad_(False)
    assert all(p is not model.head.weight for g in decay_param_groups(model, 0.1) for p in g["params"])


def test_batchnorm_weights_are_not_decayed() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert no_decay_parameter_names(model) == {"0.bias", "1.weight", "1.bias", "3.bias"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_build_optimizer_by_name(name: str) -> None:
    model = PixelEmbeddingNet() if name == "sparse_adam" else small_mlp()
    optimizer = build_optimizer(model, name, lr=0.01)
    expected = OPTIMIZERS[name][0]
    if name == "sparse_adam":
        assert isinstance(optimizer, CombinedOptimizer)
        assert [type(o) for o in optimizer.optimizers] == [torch.optim.SparseAdam, torch.optim.AdamW]
    else:
        assert isinstance(optimizer, expected)
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}


def test_named_variants_and_defaults() -> None:
    model = small_mlp()
    assert build_optimizer(model, "nesterov").defaults["nesterov"] is True
    assert build_optimizer(model, "sgd").defaults["momentum"] == 0.9
    assert build_optimizer(model, "amsgrad").defaults["amsgrad"] is True
    assert build_optimizer(model, "adadelta").defaults["lr"] == 1.0  # torch's default kept when lr=None
    adamw = build_optimizer(model, "adamw", weight_decay=0.05)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    # AdamW's own default (0.01) must not leak in when no decay was asked for
    assert all(g["weight_decay"] == 0.0 for g in build_optimizer(model, "adamw").param_groups)


def test_combined_optimizer_equals_separate_optimizers() -> None:
    torch.manual_seed(0)
    model = PixelEmbeddingNet()
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    combined = build_optimizer(model, "sparse_adam", lr=0.05, weight_decay=0.1)
    sparse = torch.optim.SparseAdam([twin.embed.weight], lr=0.05)
    dense = torch.optim.AdamW([{"params": [twin.head.weight], "weight_decay": 0.1},
                               {"params": [twin.head.bias], "weight_decay": 0.0}], lr=0.05)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(3):
        def closure(m=model):
            combined.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        combined.step(closure)
        sparse.zero_grad(), dense.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        assert twin.embed.weight.grad.is_sparse
        sparse.step(), dense.step()
    for a, b, c in zip(model.parameters(), twin.parameters(), initial.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)  # same updates as the separate pair, and real ones
    state = combined.state_dict()
    fresh = build_optimizer(copy.deepcopy(model), "sparse_adam", lr=0.05, weight_decay=0.1)
    fresh.load_state_dict(state)
    assert len(fresh.state) == 3 and int(fresh.optimizers[0].state_dict()["state"][0]["step"]) == 3


def test_distributed_lbfgs_reduces_the_closure_loss() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen = []

    def reducer(loss):
        seen.append(float(loss))
        return loss * 1.0

    plain = torch.optim.LBFGS(twin.parameters(), max_iter=4)
    agreed = DistributedLBFGS(model.parameters(), loss_reducer=reducer, max_iter=4)
    for m, opt in ((model, agreed), (twin, plain)):
        def closure(m=m, opt=opt):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert len(seen) >= 2  # every closure evaluation went through the reducer
    assert torch.equal(model.weight, twin.weight)


def test_asgd_average_is_the_mean_of_iterates() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    optimizer = torch.optim.ASGD([w], lr=0.1, t0=1, lambd=0.0)
    iterates = []
    for _ in range(6):
        optimizer.zero_grad()
        (w**2).sum().backward()
        optimizer.step()
        iterates.append(w.detach().clone())
    # torch's ASGD averages the iterates after step t0 + 1 (Polyak & Juditsky averaging)
    torch.testing.assert_close(asgd_averages(optimizer)[w], torch.stack(iterates[2:]).mean(0))


# ---------------------------------------------------------------- integration: every optimizer trains

LRS = {"adam": 1e-2, "adamw": 1e-2, "amsgrad": 1e-2, "sgd": 0.1, "nesterov": 0.1, "rmsprop": 1e-3, "adagrad": 0.05,
       "adadelta": 3.0, "nadam": 1e-2, "radam": 0.3, "lbfgs": 0.1, "rprop": 3e-3, "sparse_adam": 0.05, "asgd": 1.0}
KWARGS = {"lbfgs": {"max_iter": 4}, "asgd": {"t0": 8}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_decreases_the_loss(name: str) -> None:
    L.seed_everything(0, verbose=False)
    module = PixelEmbeddingNet() if name == "sparse_adam" else small_mlp(lr=1e-9, optimizer="sgd")
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    before = eval_loss(module, dm)
    wd = 0.0 if name in ("lbfgs", "rprop") else 1e-4
    callback = OptimizerCallback(name, lr=LRS[name], weight_decay=wd, optimizer_kwargs=KWARGS.get(name))
    trainer = L.Trainer(max_steps=15, callbacks=[callback], **quiet())
    trainer.fit(module, datamodule=dm)
    optimizer = trainer.optimizers[0]
    expected = OPTIMIZERS[name][0]
    assert isinstance(optimizer, CombinedOptimizer if name == "sparse_adam" else expected)
    after = eval_loss(module, dm)
    assert after < 0.85 * before, f"{name}: loss {before:.3f} -> {after:.3f}"
    # the module's own configure_optimizers (SGD at lr=1e-9) was not used, and is back after fit
    assert "configure_optimizers" not in module.__dict__


def test_lbfgs_closure_runs_training_step_max_iter_times() -> None:
    L.seed_everything(0, verbose=False)
    calls = []

    class Counting(DeepMLP):
        def training_step(self, batch, batch_idx):
            calls.append(self.trainer.global_step)
            return super().training_step(batch, batch_idx)

    module = Counting(depth=2, width=16)
    trainer = L.Trainer(max_steps=3, callbacks=[OptimizerCallback("lbfgs", lr=0.1, optimizer_kwargs={"max_iter": 3})],
                        **quiet())
    trainer.fit(module, datamodule=DigitsDataModule())
    # L-BFGS re-evaluates the closure (training_step + backward) up to max_iter times per optimizer step
    assert trainer.global_step == 3
    assert len(calls) > 3 and all(calls.count(step) <= 3 for step in range(3))
    assert "train_loss" in trainer.callback_metrics


def test_lbfgs_refuses_accumulation_and_fp16_amp() -> None:
    for kwargs in (dict(accumulate_grad_batches=2),):
        module = small_mlp()
        before = copy.deepcopy(module.state_dict())
        trainer = L.Trainer(max_steps=2, callbacks=[OptimizerCallback("lbfgs")], **quiet(**kwargs))
        with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
            trainer.fit(module, datamodule=DigitsDataModule())
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # nothing half-applied
    # Lightning turns 16-mixed into bf16-mixed on CPU, so the check is exercised on a Trainer stand-in
    fake = SimpleNamespace(strategy=object(), accumulate_grad_batches=1, callbacks=[], precision="16-mixed")
    module = small_mlp()
    with pytest.raises(ValueError, match="precision='16-mixed'"):
        OptimizerCallback("lbfgs").setup(fake, module, "fit")
    assert "configure_optimizers" not in module.__dict__


@pytest.mark.gpu
def test_lbfgs_refuses_fp16_amp_on_gpu() -> None:
    trainer = L.Trainer(max_steps=2, precision="16-mixed", callbacks=[OptimizerCallback("lbfgs")],
                        **quiet(accelerator="gpu"))
    with pytest.raises(ValueError, match="16-mixed"):
        trainer.fit(small_mlp(), datamodule=DigitsDataModule())


def test_lbfgs_refuses_accumulation_changed_during_the_run() -> None:
    class RaiseAccumulation(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 1:
                trainer.accumulate_grad_batches = 2

    trainer = L.Trainer(max_steps=4, callbacks=[RaiseAccumulation(), OptimizerCallback("lbfgs")], **quiet())
    with pytest.raises(ValueError, match="cannot accumulate"):
        trainer.fit(small_mlp(), datamodule=DigitsDataModule())


def test_sparse_adam_keeps_sparse_gradients_and_trains_the_dense_head() -> None:
    L.seed_everything(0, verbose=False)
    module = PixelEmbeddingNet()
    head_before = module.head.weight.detach().clone()
    grads = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(pl_module.embed.weight.grad.is_sparse)

    trainer = L.Trainer(max_steps=3, callbacks=[OptimizerCallback("sparse_adam", lr=0.01), Probe()], **quiet())
    trainer.fit(module, datamodule=DigitsDataModule())
    assert grads == [True, True, True]
    assert not torch.equal(head_before, module.head.weight)
    assert sparse_parameter_names(module) == {"embed.weight"}


def test_asgd_evaluates_and_checkpoints_with_averaged_parameters(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    seen = {}

    class Probe(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.state.fn == "fit":
                averages = asgd_averages(trainer.optimizers[0])
                seen["eval_is_averaged"] = all(torch.equal(p, averages[p]) for p in pl_module.parameters())
                seen["averages_differ"] = any(not torch.equal(p, seen["raw"][n])
                                              for n, p in pl_module.named_parameters())

        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["raw"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_epoch_end(self, trainer, pl_module):
            # after validation the raw iterate is back in the model for training
            seen["raw_back"] = all(torch.equal(p, seen["raw"][n]) for n, p in pl_module.named_parameters())

    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = OptimizerCallback("asgd", lr=0.1, optimizer_kwargs={"t0": 2})
    module = small_mlp()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=6, callbacks=[Probe(), callback, saver],
                        **quiet(limit_val_batches=1, enable_checkpointing=True))
    trainer.fit(module, datamodule=DigitsDataModule())
    # validation sees ASGD's average of the iterates (which differs from the last iterate), training the iterate
    assert seen["eval_is_averaged"] and seen["averages_differ"] and seen["raw_back"]
    averages = asgd_averages(trainer.optimizers[0])
    assert all(torch.equal(p, averages[p]) for p in module.parameters())  # fit ends with the averaged model
    path = tmp_path / "asgd.ckpt"
    trainer.save_checkpoint(path)
    loaded = DeepMLP.load_from_checkpoint(path, weights_only=True)
    for n, p in loaded.named_parameters():
        assert torch.equal(p, averages[dict(module.named_parameters())[n]])
    raw = torch.load(path, weights_only=True)["callbacks"][callback.state_key]["asgd_raw_weights"]
    assert all(torch.equal(raw[n], seen["raw"][n]) for n in raw)
    # the checkpoint ModelCheckpoint wrote during fit (raw weights in the model at that moment) is averaged too
    during = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    for n, p in module.named_parameters():
        assert torch.equal(during["state_dict"][n], averages[p])


@pytest.mark.parametrize("name,kwargs", [
    ("adamw", {"weight_decay": 0.01, "lr": 1e-2}),
    ("asgd", {"lr": 0.05, "optimizer_kwargs": {"t0": 2}}),
    ("lbfgs", {"lr": 0.2, "optimizer_kwargs": {"max_iter": 3, "history_size": 4}}),
    ("sparse_adam", {"lr": 0.05}),
])
def test_exact_resume(name: str, kwargs: dict, tmp_path) -> None:
    make_module = PixelEmbeddingNet if name == "sparse_adam" else small_mlp
    straight = assert_exact_resume(
        make_module, lambda: DigitsDataModule(batch_size=32), lambda: [OptimizerCallback(name, **kwargs)], tmp_path,
        total_steps=6,
    )
    assert straight["trainer"].optimizers[0].state  # optimizer state existed and was restored on resume


def test_asgd_exact_resume_with_validation_swaps(tmp_path) -> None:
    # validation every 2 steps swaps the averaged parameters in and the raw ones back out; none of it may leak
    # into training, and the checkpoint's averaged weights must not become the resumed run's iterate
    straight = assert_exact_resume(
        small_mlp, lambda: DigitsDataModule(batch_size=32),
        lambda: [OptimizerCallback("asgd", lr=0.1, optimizer_kwargs={"t0": 1})], tmp_path, total_steps=8,
        trainer_kwargs=dict(val_check_interval=2, limit_val_batches=1),
    )
    averages = asgd_averages(straight["trainer"].optimizers[0])
    assert all(torch.equal(p, averages[p]) for p in straight["module"].parameters())


# ---------------------------------------------------------------- bad input

def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="name='adamx' is not allowed"):
        OptimizerCallback("adamx")
    with pytest.raises(ValueError, match="weight_decay"):
        OptimizerCallback("lbfgs", weight_decay=0.1)
    with pytest.raises(ValueError, match=r"\['betaz'\] are not arguments of AdamW"):
        OptimizerCallback("adamw", optimizer_kwargs={"betaz": (0.9, 0.99)})
    with pytest.raises(ValueError, match="must not contain 'lr'"):
        OptimizerCallback("adam", optimizer_kwargs={"lr": 0.1})
    with pytest.raises(ValueError, match="lr must be a number in"):
        OptimizerCallback("adam", lr=-1.0)
    with pytest.raises(ValueError, match="dense_optimizer='lbfgs'"):
        OptimizerCallback("sparse_adam", dense_optimizer="lbfgs")
    with pytest.raises(TypeError, match="no_decay"):
        OptimizerCallback("adam", no_decay="bias")


def test_sparse_adam_without_sparse_embedding_is_refused_in_setup() -> None:
    module = small_mlp()
    before = copy.deepcopy(module.state_dict())
    trainer = L.Trainer(max_steps=2, callbacks=[OptimizerCallback("sparse_adam")], **quiet())
    with pytest.raises(ValueError, match="sparse=True"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert "configure_optimizers" not in module.__dict__


def test_configure_optimizers_is_restored_after_fit() -> None:
    module = small_mlp()
    trainer = L.Trainer(max_steps=1, callbacks=[OptimizerCallback("adam")], **quiet())
    trainer.fit(module, datamodule=DigitsDataModule())
    assert "configure_optimizers" not in module.__dict__
    assert isinstance(module.configure_optimizers(), torch.optim.SGD)  # the module's own choice again
