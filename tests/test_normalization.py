"""Z-score and Min-Max normalisation: core vs formula / scikit-learn, train+eval application with train statistics,
export, exact resume without refitting, DDP (the group's one DDP script), bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import MinMaxNormalization, MinMaxScale, Standardize, ZScoreNormalization
from lightning_techniques.demo import BreastCancerDataModule, DigitsCNN, DigitsDataModule, TabularMLP
from lightning_techniques.normalization.minmax import batch_min_max, min_max_scale_params
from lightning_techniques.normalization.zscore import batch_moments, merge_moments, safe_std
from lightning_techniques.testing import assert_exact_resume, assert_ranks_agree, run_ddp_script

ROOT = Path(__file__).resolve().parents[1]


class Capture(Callback):
    """Records the (already transformed) inputs every step sees."""

    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append(batch[0].detach().clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(batch[0].detach().clone())


def _fit(callbacks, trainer_kwargs, module=None, datamodule=None, **kw):
    L.seed_everything(0, verbose=False)
    datamodule = datamodule or BreastCancerDataModule()
    module = module or TabularMLP()
    trainer = L.Trainer(callbacks=callbacks, **{**trainer_kwargs, **kw})
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule


def _validate(callbacks, module, datamodule, trainer_kwargs) -> dict:
    return L.Trainer(callbacks=callbacks, **trainer_kwargs).validate(module, datamodule=datamodule, verbose=False)[0]


# ------------------------------------------------------------------------------------------------------ unit: core


def test_chan_welford_merge_matches_two_pass_and_is_stable() -> None:
    gen = torch.Generator().manual_seed(0)
    # a huge offset: the naive E[x^2] - E[x]^2 loses every digit even in float64, Welford/Chan does not
    x = 1e9 + torch.randn(1000, 7, generator=gen, dtype=torch.float64) * 0.5
    acc = (0, None, None)
    for chunk in x.split(77):
        acc = merge_moments(acc, batch_moments(chunk)) if acc[1] is not None else batch_moments(chunk)
    count, mean, m2 = acc
    assert count == 1000
    torch.testing.assert_close(mean, x.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(m2 / count, x.var(0, unbiased=False), rtol=1e-6, atol=0)
    naive = (x.square().mean(0) - x.mean(0).square())
    assert (naive - x.var(0, unbiased=False)).abs().max() > 1e-2  # the naive formula is really broken here


def test_per_channel_and_global_moments() -> None:
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    n, mean, m2 = batch_moments(x, "channel")
    assert n == 6 * 4 * 5 and mean.shape == (3, 1, 1)
    torch.testing.assert_close(mean.flatten(), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close((m2 / n).flatten(), x.var(dim=(0, 2, 3), unbiased=False))
    n, mean, m2 = batch_moments(x, "global")
    assert n == x.numel() and mean.shape == (1, 1, 1)
    lo, hi = batch_min_max(x, "channel")
    torch.testing.assert_close(hi.flatten(), x.amax(dim=(0, 2, 3)))
    torch.testing.assert_close(lo.flatten(), x.amin(dim=(0, 2, 3)))


def test_zero_variance_and_zero_range_are_guarded() -> None:
    std = safe_std(torch.tensor([0.0, 4.0], dtype=torch.float64), 4)
    assert std.tolist() == [1.0, 1.0]
    x = torch.tensor([[5.0, 1.0], [5.0, 3.0]])
    out = Standardize(torch.tensor([5.0, 2.0]), torch.tensor([1.0, 1.0]))(x)
    assert torch.isfinite(out).all() and out[:, 0].tolist() == [0.0, 0.0]
    scale, offset = min_max_scale_params(x.double().amin(0), x.double().amax(0))
    out = MinMaxScale(scale, offset)(x)
    assert torch.isfinite(out).all() and out.tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_exported_modules_match_scikit_learn() -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x = load_breast_cancer().data
    xt = torch.tensor(x, dtype=torch.float64)
    z = ZScoreNormalization()
    z.fit(xt.split(100))
    np.testing.assert_allclose(z.export_module()(xt).numpy(), StandardScaler().fit_transform(x), atol=1e-10)
    m = MinMaxNormalization(feature_range=[-1.0, 2.0])
    m.fit([(chunk, None) for chunk in xt.split(64)])
    expected = MinMaxScaler(feature_range=(-1, 2)).fit_transform(x)
    np.testing.assert_allclose(m.export_module()(xt).numpy(), expected, atol=1e-10)


def test_fit_on_dict_batches_with_input_key() -> None:
    x = torch.randn(40, 3) * 4 + 2
    norm = ZScoreNormalization(input_key="features")
    norm.fit([{"features": c, "label": torch.zeros(len(c))} for c in x.split(16)])
    torch.testing.assert_close(norm.mean, x.double().mean(0))
    torch.testing.assert_close(norm.std, x.double().std(0, unbiased=False))


@pytest.mark.parametrize("cls, stat", [(ZScoreNormalization, "mean"), (MinMaxNormalization, "min")])
def test_non_finite_training_data_is_named(cls, stat) -> None:
    x = torch.randn(30, 5)
    x[3, 1] = float("nan")  # feature 1: NaN
    x[7, 4] = float("inf")  # feature 4: +Inf
    norm = cls()
    with pytest.raises(ValueError, match=rf"{cls.__name__}: the training inputs contain non-finite values, so the "
                                         rf"fitted '{stat}' / .* would be NaN/Inf: 1 of 5 features \(per='feature'\) "
                                         r"hold NaN and 1 hold \+/-Inf"):
        norm.fit([x[:16], x[16:]])
    assert not norm.fitted  # nothing half-applied


def test_non_finite_training_data_fails_before_the_first_step(trainer_kwargs) -> None:
    from lightning_techniques.demo.data import LabeledTensorDataset

    class NaNData(L.LightningDataModule):
        def train_dataloader(self):
            x = torch.randn(32, 30)
            x[:, 2] = float("nan")
            return torch.utils.data.DataLoader(LabeledTensorDataset(x, torch.zeros(32, dtype=torch.long)),
                                               batch_size=8)

    module = TabularMLP()
    trainer = L.Trainer(max_steps=2, callbacks=[ZScoreNormalization()], **trainer_kwargs)
    with pytest.raises(ValueError, match="ZScoreNormalization: the training inputs contain non-finite values"):
        trainer.fit(module, datamodule=NaNData())
    assert trainer.global_step == 0 and "on_after_batch_transfer" not in module.__dict__


# ----------------------------------------------------------------------------------------------- integration: effect


@pytest.mark.parametrize("cls", [ZScoreNormalization, MinMaxNormalization])
def test_training_inputs_are_normalised_and_val_uses_train_statistics(cls, trainer_kwargs) -> None:
    norm, cap = cls(), Capture()
    _, _, dm = _fit([norm, cap], trainer_kwargs, max_epochs=1)
    seen = torch.cat(cap.train)
    raw_train = dm.train_dataset.inputs
    raw_val = dm.val_dataset.inputs
    assert seen.shape == raw_train.shape  # one full epoch: every training sample exactly once
    val_seen = torch.cat(cap.val)
    if cls is ZScoreNormalization:
        torch.testing.assert_close(seen.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
        torch.testing.assert_close(seen.std(0, unbiased=False), torch.ones(30), atol=1e-5, rtol=0)
        torch.testing.assert_close(norm.mean, raw_train.double().mean(0))
        expected = (raw_val - norm.mean.float()) / norm.std.float()
        own = (raw_val - raw_val.mean(0)) / raw_val.std(0, unbiased=False)
    else:
        torch.testing.assert_close(seen.amin(0), torch.zeros(30), atol=1e-6, rtol=0)
        torch.testing.assert_close(seen.amax(0), torch.ones(30), atol=1e-6, rtol=0)
        lo, hi = raw_train.amin(0), raw_train.amax(0)
        expected = (raw_val - lo) / (hi - lo)
        own = (raw_val - raw_val.amin(0)) / (raw_val.amax(0) - raw_val.amin(0))
    torch.testing.assert_close(val_seen, expected, atol=1e-5, rtol=1e-5)  # the train statistics ...
    assert (val_seen - own).abs().max() > 1e-2  # ... never the validation split's own


@pytest.mark.slow  # ~2 s alone; 14-32 s measured on the shared 2-core machine with 2 torch threads
def test_normalisation_makes_raw_tabular_data_trainable(trainer_kwargs) -> None:
    """Breast-cancer's raw features span 5 orders of magnitude; standardised, the same MLP (same seed, same
    40 steps) reaches a much lower validation loss and a higher accuracy."""
    results = {}
    for name, callbacks in (("raw", []), ("zscore", [ZScoreNormalization()])):
        L.seed_everything(1, verbose=False)
        module, dm = TabularMLP(), BreastCancerDataModule()
        L.Trainer(callbacks=callbacks, max_steps=40, limit_val_batches=0, **trainer_kwargs).fit(module, datamodule=dm)
        results[name] = _validate(callbacks, module, dm, trainer_kwargs)
    raw, zscore = results["raw"], results["zscore"]
    assert zscore["val_acc"] >= 0.93 and zscore["val_acc"] > raw["val_acc"], results
    assert zscore["val_loss"] < 0.5 * raw["val_loss"], results


def test_export_module_gives_identical_outputs_to_the_in_training_transform(trainer_kwargs) -> None:
    norm, cap = ZScoreNormalization(), Capture()
    trainer, module, dm = _fit([norm, cap], trainer_kwargs, max_steps=3, limit_val_batches=0)
    _validate([norm, cap], module, dm, trainer_kwargs)  # a new Trainer, the same fitted callback
    exported = norm.export_module()
    assert isinstance(exported, Standardize) and not list(exported.parameters())
    raw_val = dm.val_dataset.inputs
    assert torch.equal(exported(raw_val), torch.cat(cap.val))  # bit-identical to what validation saw
    # predict runs through the same transform: the exported pipeline reproduces the Trainer's predictions
    preds = torch.cat(trainer.predict(module, datamodule=dm))
    pipeline = nn.Sequential(exported, module).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipeline(dm.test_dataset.inputs).softmax(1), preds, atol=0, rtol=0)
    # the transform is removed at teardown: the datamodule's hook is back to the class's
    assert "on_after_batch_transfer" not in vars(dm)


def test_per_channel_on_images(trainer_kwargs) -> None:
    norm, cap = ZScoreNormalization(per="channel"), Capture()
    _fit([norm, cap], trainer_kwargs, module=DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=256),
         max_epochs=1, limit_val_batches=0)
    assert norm.mean.shape == (1, 1, 1)
    seen = torch.cat(cap.train)
    assert abs(float(seen.mean())) < 1e-5 and abs(float(seen.std(unbiased=False)) - 1) < 1e-5


# ------------------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("cls", [ZScoreNormalization, MinMaxNormalization])
def test_exact_resume_never_refits(cls, tmp_path) -> None:
    made: list = []

    def callbacks():
        made.append(cls())
        return [made[-1]]

    assert_exact_resume(TabularMLP, BreastCancerDataModule, callbacks, tmp_path, total_steps=8,
                        trainer_kwargs={"val_check_interval": 4})
    straight, first_half, resumed = made
    assert straight.num_fits == 1 and first_half.num_fits == 1
    assert resumed.num_fits == 0  # statistics came from the checkpoint
    for key in straight.stats:
        assert torch.equal(straight.stats[key], resumed.stats[key])


def test_test_stage_uses_checkpoint_statistics(trainer_kwargs, tmp_path) -> None:
    norm = ZScoreNormalization()
    trainer, module, dm = _fit([norm], trainer_kwargs, max_steps=2)
    ckpt = tmp_path / "n.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh, cap = ZScoreNormalization(), Capture()

    class CaptureTest(Capture):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.val.append(batch[0].detach().clone())

    cap = CaptureTest()
    L.Trainer(callbacks=[fresh, cap], **trainer_kwargs).test(TabularMLP(), datamodule=BreastCancerDataModule(),
                                                              ckpt_path=str(ckpt), verbose=False)
    assert fresh.num_fits == 0 and torch.equal(fresh.mean, norm.mean)
    torch.testing.assert_close(torch.cat(cap.val), norm.export_module()(dm.test_dataset.inputs))


# --------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per": "pixel"}, "per="),
        ({"eps": -1.0}, "eps"),
        ({"fit_batch_size": 0}, "fit_batch_size"),
        ({"stages": ["validate"]}, "must include 'train'"),
        ({"stages": ["train", "eval"]}, "stages entry"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ZScoreNormalization(**kwargs)


@pytest.mark.parametrize("feature_range", [[1.0, 0.0], [0.0], "01"])
def test_bad_feature_range(feature_range) -> None:
    with pytest.raises(ValueError, match="feature_range"):
        MinMaxNormalization(feature_range=feature_range)


def test_unfitted_evaluation_and_shape_mismatch_fail_clearly(trainer_kwargs) -> None:
    with pytest.raises(RuntimeError, match="no statistics"):
        L.Trainer(callbacks=[ZScoreNormalization()], **trainer_kwargs).validate(
            TabularMLP(), datamodule=BreastCancerDataModule(), verbose=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        MinMaxNormalization().export_module()
    norm = ZScoreNormalization()
    norm.fit([torch.randn(8, 30)])
    with pytest.raises(ValueError, match="does not match the fitted statistics"):
        norm.export_module()(torch.randn(4, 29))
    with pytest.raises(ValueError, match="per="):
        ZScoreNormalization(per="channel").load_state_dict(norm.state_dict())


# --------------------------------------------------------------------------------------------------------------- DDP


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_transforms_group(tmp_path) -> None:
    """The group's DDP script: normalisation statistics all-reduced over 2 ranks equal the single-process ones on
    the full training split; noise / augmentation / MixUp runs keep the ranks' weights identical."""
    results = run_ddp_script(ROOT / "tests" / "ddp" / "ddp_transforms.py", tmp_path)
    assert_ranks_agree(results)
    r0 = results[0]
    torch.testing.assert_close(r0["zscore_mean"], r0["reference_mean"], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(r0["zscore_std"], r0["reference_std"], rtol=1e-12, atol=1e-9)
    assert torch.equal(r0["minmax_min"], r0["reference_min"]) and torch.equal(r0["minmax_max"], r0["reference_max"])
    # every sample counted exactly once over the two ranks (each rank fitted on its half, not the full set)
    assert r0["zscore_count"] == r0["n_train"]
    assert r0["resumed_num_fits"] == 0  # resumed under DDP: statistics from the checkpoint on every rank
    # training with noise + augmentation + MixUp under DDP: the weights moved and stayed identical on both ranks
    assert r0["augment_weights_changed"]


def test_statistics_fitted_by_the_user_are_kept(trainer_kwargs) -> None:
    dm = BreastCancerDataModule()
    dm.setup()
    norm = ZScoreNormalization()
    norm.fit(dm.train_dataset.inputs[:100].split(25))  # e.g. a subsample, or statistics from elsewhere
    mean = norm.mean.clone()
    _fit([norm], trainer_kwargs, datamodule=dm, max_steps=1, limit_val_batches=0)
    assert norm.num_fits == 1 and torch.equal(norm.mean, mean)
