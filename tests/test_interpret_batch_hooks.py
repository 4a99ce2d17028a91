"""Loggers that fetch their own samples see them as the model does: through the stage's batch-transfer hooks.

Regression for "attribution loggers explain inputs the model never sees": with ``ZScoreNormalization`` the logged
inputs were the raw ``dataset[i]`` (validation accuracy 0.87, accuracy on the logged inputs 0.11).
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import IntegratedGradientsLogger, SaliencyLogger, SHAPLogger, ZScoreNormalization
from lightning_techniques._internal.eval_stages import batch_as_seen, fetch_samples
from lightning_techniques.demo import DigitsCNN, DigitsDataModule

warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ValPredictions(Callback):
    """Records the model's predictions and the inputs ``validation_step`` really received, in loader order."""

    def __init__(self) -> None:
        self.preds: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.epochs: list[torch.Tensor] = []  # the predictions of every validation epoch

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.preds, self.inputs = [], []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(torch.cat(self.preds))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x = batch[0]
        self.inputs.append(x.detach().clone())
        self.preds.append(pl_module(x).argmax(dim=1).detach().clone())


def quiet(**kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, logger=False)
    base.update(kwargs)
    return L.Trainer(**base)


def _samples_table(root: Path, name: str) -> list[dict[str, str]]:
    files = sorted((root / "artifacts" / name / "val").glob("samples_step*.csv"))
    assert files
    return list(csv.DictReader(files[-1].open()))


def test_zscore_normalised_run_logs_the_normalised_inputs_and_the_real_predictions(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    saliency = SaliencyLogger(every_n_val_epochs=1, max_samples=10)
    wrong = IntegratedGradientsLogger(n_steps=8, every_n_val_epochs=1, selection="confident_wrong", max_samples=4)
    recorder = ValPredictions()
    data = DigitsDataModule()
    # a shift the digits' [0, 1] pixels never have: the model only works on normalised inputs
    trainer = quiet(max_epochs=3, default_root_dir=str(tmp_path),
                    callbacks=[ZScoreNormalization(per="channel"), recorder, saliency, wrong])
    trainer.fit(DigitsCNN(channels=8, lr=1e-2), datamodule=data)

    real_preds = torch.cat(recorder.preds)
    seen_inputs = torch.cat(recorder.inputs)
    val = data.val_dataset
    indices = saliency.indices["val"]
    # the logged inputs are those validation_step received, not dataset[i] ...
    assert torch.allclose(saliency.last["inputs"], seen_inputs[indices])
    assert not torch.allclose(saliency.last["inputs"], val.inputs[indices])
    # ... the raw ones are kept for display ...
    assert torch.equal(saliency.last["raw_inputs"], val.inputs[indices])
    assert (tmp_path / "artifacts" / "saliency" / "val").glob("raw_inputs_step*.npy")
    # ... and the logged predictions are the model's predictions on the real validation batches
    assert torch.equal(saliency.last["predictions"], real_preds[indices])
    rows = _samples_table(tmp_path, "saliency")
    assert [int(r["prediction"]) for r in rows] == real_preds[indices].tolist()
    val_acc = float((real_preds == val.targets).float().mean())
    logged_acc = float((saliency.last["predictions"] == saliency.last["labels"]).float().mean())
    assert val_acc > 0.6 and logged_acc >= 0.5  # (before the fix: ~0.1 on the raw inputs)
    # confident_wrong picks (at its first event: epoch 1) samples the model really got wrong on its real inputs
    picked = wrong.indices["val"]
    assert all(int(recorder.epochs[0][i]) != int(val.targets[i]) for i in picked)
    assert torch.equal(wrong.last["predictions"], real_preds[picked])


class HookedCNN(DigitsCNN):
    """A user's own batch hooks: scale before the transfer, shift after it outside training only."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return 2.0 * x, y

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x if self.trainer.training else x - 1.0), y


class HookedData(DigitsDataModule):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x if self.trainer.training else -x), y


@pytest.mark.parametrize("where", ["module", "datamodule"])
def test_users_own_batch_hooks_are_applied_in_the_logged_stage(tmp_path, where: str) -> None:
    L.seed_everything(0, verbose=False)
    saliency = SaliencyLogger(every_n_val_epochs=1, max_samples=4)
    shap = SHAPLogger(background_size=6, max_samples=2, nsamples=8, every_n_val_epochs=1)
    recorder = ValPredictions()
    model = HookedCNN(channels=4) if where == "module" else DigitsCNN(channels=4)
    data = HookedData() if where == "datamodule" else DigitsDataModule()
    trainer = quiet(max_epochs=1, limit_train_batches=2, default_root_dir=str(tmp_path),
                    callbacks=[recorder, saliency, shap])
    trainer.fit(model, datamodule=data)
    val, train = data.val_dataset, data.train_dataset

    def as_validated(x: torch.Tensor) -> torch.Tensor:  # what Lightning's hooks do at validation
        return 2.0 * x - 1.0 if where == "module" else -x

    indices = saliency.indices["val"]
    seen = torch.cat(recorder.inputs)
    torch.testing.assert_close(seen[indices], as_validated(val.inputs[indices]))
    torch.testing.assert_close(saliency.last["inputs"], seen[indices])
    assert torch.equal(saliency.last["predictions"], torch.cat(recorder.preds)[indices])
    # the SHAP background goes through the hooks of the explained stage as well
    background = shap.background(trainer, "val")
    torch.testing.assert_close(background, as_validated(train.inputs[shap.indices["background"]]))
    # at test end: the test stage's hooks
    trainer.test(model, datamodule=data, verbose=False)
    test_event = saliency.last
    torch.testing.assert_close(test_event["inputs"], as_validated(data.test_dataset.inputs[saliency.indices["test"]]))


def test_fetch_samples_keeps_the_raw_batch_and_restores_the_stage(tmp_path) -> None:
    model, data = HookedCNN(channels=4), DigitsDataModule()
    trainer = quiet(max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    stage_before = trainer.state.stage
    raw, seen = fetch_samples(trainer, data.val_dataset, [0, 3], "validate")
    assert torch.equal(raw[0], data.val_dataset.inputs[[0, 3]])  # untouched by the hooks
    torch.testing.assert_close(seen[0], 2.0 * raw[0] - 1.0)
    train_seen = batch_as_seen(trainer, (raw[0].clone(), raw[1]), "train")
    torch.testing.assert_close(train_seen[0], 2.0 * raw[0])  # the training branch of the user's hook
    assert trainer.state.stage == stage_before
    with pytest.raises(ValueError, match="stage='fit'"):
        batch_as_seen(trainer, raw, "fit")


def test_loop_batch_loggers_score_the_normalised_inputs(tmp_path) -> None:
    """PermutationImportance (like TSNELogger, AttentionMapLogger and EvaluationReport) takes the batches the loop
    hands to ``on_validation_batch_end``, already through the hooks: its baseline is the model's real accuracy."""
    from lightning_techniques import PermutationImportance

    L.seed_everything(0, verbose=False)
    imp = PermutationImportance(stages=["validate"], n_repeats=1, max_samples=10_000)
    recorder = ValPredictions()
    data = DigitsDataModule()
    trainer = quiet(max_epochs=1, limit_train_batches=10, default_root_dir=str(tmp_path),
                    callbacks=[ZScoreNormalization(per="channel"), recorder, imp])
    trainer.fit(DigitsCNN(channels=8, lr=1e-2), datamodule=data)
    real_acc = float((torch.cat(recorder.preds) == data.val_dataset.targets).double().mean())
    assert imp.results["val"]["baseline"] == pytest.approx(real_acc, abs=1e-9)
    assert imp.results["val"]["n"] == len(data.val_dataset)
