"""Batch-normalisation techniques: PreciseBN (statistics equal the hand-computed averages over the chosen batches),
FreezeBatchNorm (statistics and affine weights do not move while the rest trains; restored), NormSwap (GroupNorm
formula, carried weights, training with batch size 2, declared change), SyncBatchNormConversion (convert / revert
round trip, single-process no-op, refusals), bad input."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import FreezeBatchNorm, NormSwap, PreciseBN, SyncBatchNormConversion
from lightning_techniques._internal.compat import layer_sync_enabled
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.functional import (
    batchnorm_layers,
    convert_sync_batchnorm_,
    group_norm_from_batch_norm,
    precise_bn_stats_,
    revert_sync_batchnorm_,
)
from lightning_techniques.testing.contract import assert_fingerprints_equal, module_fingerprint


def _trainer(callbacks: list[Any], tmp_path: Any, **kw: Any) -> L.Trainer:
    args: dict[str, Any] = {"max_steps": 4, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                            "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
                            "devices": 1, "default_root_dir": str(tmp_path)}
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


# ---------------------------------------------------------------------------------------------------------------- core


def test_precise_bn_stats_equal_the_average_of_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 3),
                          nn.BatchNorm1d(3, momentum=0.3))
    model.train()
    batches = [torch.randn(8, 5) * (i + 1) + i for i in range(5)]
    with torch.no_grad():  # by hand: BN 1 sees Linear(x); BN 2 sees the next layer of the BN-normalised, no-dropout path
        h1 = [model[0](x) for x in batches]
        mean1 = torch.stack([h.mean(0) for h in h1]).mean(0)
        var1 = torch.stack([h.var(0, unbiased=True) for h in h1]).mean(0)
        h2 = [model[4](torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
                                  * model[1].weight + model[1].bias)) for h in h1]
        mean2 = torch.stack([h.mean(0) for h in h2]).mean(0)
        var2 = torch.stack([h.var(0, unbiased=True) for h in h2]).mean(0)
    tracked = model[1].num_batches_tracked.clone()
    n = precise_bn_stats_(model, batches)
    assert n == 5
    torch.testing.assert_close(model[1].running_mean, mean1)
    torch.testing.assert_close(model[1].running_var, var1)
    torch.testing.assert_close(model[5].running_mean, mean2)
    torch.testing.assert_close(model[5].running_var, var2)
    assert model[5].momentum == 0.3 and model[1].momentum == 0.1  # restored
    assert torch.equal(model[1].num_batches_tracked, tracked)
    assert all(m.training for m in model.modules())  # modes restored


def test_batchnorm_layers_selects_and_refuses() -> None:
    model = DigitsCNN(channels=4, batch_norm=True)
    assert [p for p, _ in batchnorm_layers(model)] == ["features.1.0", "features.3.0", "features.6.0"]
    assert [p for p, _ in batchnorm_layers(model, ["features\\.[13]\\.0"])] == ["features.1.0", "features.3.0"]
    with pytest.raises(ValueError, match="has no BatchNorm layer.*features.0 \\(Conv2d\\)"):
        batchnorm_layers(DigitsCNN(channels=4))
    with pytest.raises(ValueError, match="targets: 'head' matches no layer of type _BatchNorm.*features.1.0"):
        batchnorm_layers(model, ["head"])


# ------------------------------------------------------------------------------------------------------------ adapter


class _Snapshot(Callback):
    def __init__(self) -> None:
        self.before_val: list[dict[str, torch.Tensor]] = []

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.before_val.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def test_precise_bn_on_a_stock_trainer_matches_hand_computation(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, batch_norm=True)
    data = DigitsDataModule(batch_size=16)
    precise = PreciseBN(num_batches=5, seed=3)
    _trainer([precise], tmp_path).fit(model, datamodule=data)  # at_fit_end only (no validation)
    assert precise.recomputed == 1 and len(precise.last_indices) == 5
    assert all(len(ix) == 16 for ix in precise.last_indices)
    dataset = data.train_dataset
    with torch.no_grad():
        acts = [model.features[0](torch.stack([dataset[i][0] for i in ix])) for ix in precise.last_indices]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(model.features[1][0].running_mean, mean)
    torch.testing.assert_close(model.features[1][0].running_var, var)
    assert model.training  # modes as before fit
    assert model.features[1][0].momentum == 0.1


def test_precise_bn_runs_before_each_validation_and_not_in_sanity_check(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, batch_norm=True)
    precise = PreciseBN(num_batches=3, at_fit_end=False)
    _trainer([precise], tmp_path, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1).fit(
        model, datamodule=DigitsDataModule(batch_size=16))
    assert precise.recomputed == 2  # steps 2 and 4; not the sanity check
    assert not model.features[1][0].running_mean.is_inference()


def test_precise_bn_refuses_a_model_without_batchnorm(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        _trainer([PreciseBN()], tmp_path).fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16))


@pytest.mark.parametrize("kwargs, error", [
    ({"num_batches": 0}, ValueError), ({"num_batches": 1.5}, TypeError), ({"batch_size": -1}, ValueError),
    ({"before_validation": False, "at_fit_end": False}, ValueError), ({"at_fit_end": "yes"}, TypeError),
])
def test_precise_bn_bad_input(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        PreciseBN(**kwargs)


def test_freeze_batchnorm_keeps_stats_and_affine_while_the_rest_trains(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, batch_norm=True)
    with torch.no_grad():
        model.features[1][0].running_mean.fill_(0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze = FreezeBatchNorm(targets=["features\\.1\\.0", "features.3.0"])
    _trainer([freeze], tmp_path).fit(model, datamodule=DigitsDataModule(batch_size=16))
    after = model.state_dict()
    for key in before:
        if key.startswith(("features.1.0.", "features.3.0.")):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert not torch.equal(before["features.6.0.running_mean"], after["features.6.0.running_mean"])  # not chosen
    assert not torch.equal(before["features.6.0.weight"], after["features.6.0.weight"])
    assert freeze.frozen_layers == ["features.1.0", "features.3.0"]
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored


def test_freeze_batchnorm_stats_only_lets_affine_train(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer([FreezeBatchNorm(freeze_affine=False)], tmp_path).fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert torch.equal(before["features.1.0.running_var"], model.features[1][0].running_var)
    assert not torch.equal(before["features.1.0.weight"], model.features[1][0].weight)


def test_freeze_batchnorm_restores_after_an_exception(tmp_path: Any) -> None:
    class _Boom(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:
                raise RuntimeError("boom")

    model = DigitsCNN(channels=4, batch_norm=True)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer([FreezeBatchNorm(), _Boom()], tmp_path).fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_freeze_batchnorm_bad_input(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="freeze nothing"):
        FreezeBatchNorm(freeze_stats=False, freeze_affine=False)
    with pytest.raises(TypeError, match="targets"):
        FreezeBatchNorm(targets=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'conv' matches no layer.*features.1.0 \\(BatchNorm2d\\)"):
        _trainer([FreezeBatchNorm(targets=["conv"])], tmp_path).fit(
            DigitsCNN(channels=4, batch_norm=True), datamodule=DigitsDataModule(batch_size=16))


# ------------------------------------------------------------------------------------------------------------ NormSwap


def test_group_norm_from_batch_norm_carries_affine_and_normalises_per_group() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    gn = group_norm_from_batch_norm(bn, "group", num_groups=4)
    assert (gn.num_groups, gn.num_channels, gn.eps) == (4, 8, 1e-3)
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    x = torch.randn(2, 8, 5, 5)
    xg = x.reshape(2, 4, -1)
    ref = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-3))
    ref = ref.reshape_as(x) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(gn(x), ref)
    layer = group_norm_from_batch_norm(bn, "layer")  # LayerNorm over (C, H, W), per-channel affine
    expected = F.layer_norm(x, (8, 5, 5), eps=1e-3) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), expected)
    assert group_norm_from_batch_norm(bn, "instance").num_groups == 8
    assert not group_norm_from_batch_norm(nn.BatchNorm1d(3, affine=False), "layer").affine
    with pytest.raises(ValueError, match="features.1.0 has 8 channels, not divisible into 3 groups; choose one of"):
        group_norm_from_batch_norm(bn, "group", num_groups=3, path="features.1.0")


def test_norm_swap_trains_with_batch_size_2_and_declares_its_change(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, batch_norm=True)
    with torch.no_grad():
        model.features[1][0].weight.fill_(1.5)
    swap = NormSwap(to="group", num_groups=2, targets=["features\\.[13]\\.0"])
    assert swap.changed_paths == () and NormSwap.changes_module
    head_before = model.head.weight.detach().clone()
    _trainer([swap], tmp_path, max_steps=6).fit(model, datamodule=DigitsDataModule(batch_size=2))
    assert swap.changed_paths == ("features.1.0", "features.3.0")
    assert isinstance(model.features[1][0], nn.GroupNorm) and model.features[1][0].num_groups == 2
    assert isinstance(model.features[6][0], nn.BatchNorm2d)  # not chosen
    assert not torch.equal(model.head.weight, head_before)  # it trained ...
    assert not torch.allclose(model.features[1][0].weight, torch.full((4,), 1.5))  # ... the carried GN weights too
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a second fit with the same objects does not swap again (nothing left to swap on these paths)
    _trainer([swap], tmp_path, max_steps=2).fit(model, datamodule=DigitsDataModule(batch_size=2))
    assert swap.changed_paths == ("features.1.0", "features.3.0")


def test_norm_swap_bad_input(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="to='batch' is not allowed"):
        NormSwap(to="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_groups"):
        NormSwap(num_groups=0)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        _trainer([NormSwap()], tmp_path).fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=2))
    model = DigitsCNN(channels=4, batch_norm=True)
    with pytest.raises(ValueError, match="not divisible into 3 groups"):
        _trainer([NormSwap(num_groups=3)], tmp_path).fit(model, datamodule=DigitsDataModule(batch_size=2))
    assert all(isinstance(model.features[i][0], nn.BatchNorm2d) for i in (1, 3, 6))  # nothing half-applied


# ---------------------------------------------------------------------------------------------- SyncBatchNormConversion


def test_sync_batchnorm_convert_and_revert_round_trip_keeps_the_module() -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, batch_norm=True)
    before = module_fingerprint(model)
    originals = convert_sync_batchnorm_(model, ["features.1.0", "features.6.0"])
    assert list(originals) == ["features.1.0", "features.6.0"]
    sync = model.features[1][0]
    assert isinstance(sync, nn.SyncBatchNorm) and isinstance(model.features[3][0], nn.BatchNorm2d)
    assert sync.weight is originals["features.1.0"].weight  # shared parameters: the optimizer sees the same ones
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 8, 8)
    for _ in range(2):  # one process, no process group: SyncBatchNorm falls back to plain BN
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    revert_sync_batchnorm_(model, originals)
    assert model.features[1][0] is originals["features.1.0"]
    assert_fingerprints_equal(before, module_fingerprint(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert int(model.features[1][0].num_batches_tracked) == 2


def test_sync_batchnorm_is_a_logged_no_op_in_one_process(tmp_path: Any, caplog: Any) -> None:
    model = DigitsCNN(channels=4, batch_norm=True)
    layer = model.features[6][0]
    convert = SyncBatchNormConversion(targets=["features\\.6\\.0"])
    with caplog.at_level(logging.INFO, logger="lightning_techniques.normalization.batchnorm"):
        _trainer([convert], tmp_path, max_steps=2).fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert "single process has nothing to synchronise; features.6.0" in caplog.text
    assert convert.converted == []
    assert model.features[6][0] is layer and type(layer) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="'head' matches no layer of type _BatchNorm"):
        _trainer([SyncBatchNormConversion(targets=["head"])], tmp_path).fit(
            model, datamodule=DigitsDataModule(batch_size=16))


def test_sync_batchnorm_refusals_under_ddp_settings(tmp_path: Any) -> None:
    model = DigitsCNN(channels=4, batch_norm=True)
    ddp = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "logger": False}
    convert = SyncBatchNormConversion()
    trainer = L.Trainer(callbacks=[convert], sync_batchnorm=True, **ddp)  # not launched: setup is called by hand
    assert layer_sync_enabled(trainer) and not layer_sync_enabled(L.Trainer(logger=False))
    with pytest.raises(ValueError, match="sync_batchnorm=True"):
        convert.setup(trainer, model, "fit")
    with pytest.raises(ValueError, match="CUDA / XPU tensors only; this run is on 'cpu'"):
        convert.setup(L.Trainer(callbacks=[convert], **ddp), model, "fit")
    assert all(type(model.features[i][0]) is nn.BatchNorm2d for i in (1, 3, 6))  # nothing half-applied
    with pytest.raises(TypeError, match="targets"):
        SyncBatchNormConversion(targets=5)  # type: ignore[arg-type]
