"""EarlyStopping with best-weight restore: unit, integration (effect), resume, disk storage, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import EarlyStopping
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.regularization.early_stopping import restore_state, snapshot_state
from lightning_techniques.testing import assert_exact_resume, assert_same


class ScriptedMetric(DigitsCNN):
    """Trains normally but reports a scripted ``val_score`` per epoch, so the best epoch is known in advance."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__(channels=4)
        self.scores = scores

    def on_validation_epoch_end(self) -> None:
        epoch = min(self.current_epoch, len(self.scores) - 1)
        self.log("val_score", torch.tensor(self.scores[epoch]))


class WeightsPerEpoch(Callback):
    """Records the weights at each validation end (after the ES check of that epoch)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.weights[trainer.current_epoch] = snapshot_state(pl_module)


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=3, limit_val_batches=1,
                default_root_dir=str(tmp_path))
    base.update(kwargs)
    return L.Trainer(callbacks=callbacks, **base)


def test_snapshot_and_restore_core() -> None:
    model = nn.Linear(3, 2)
    state = snapshot_state(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(model.weight.detach(), state["weight"])
    weight_object = model.weight
    restore_state(model, state)
    assert torch.equal(model.weight.detach(), state["weight"]) and model.weight is weight_object


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_stops_and_restores_the_best_epoch_weights(tmp_path: Path, storage: str) -> None:
    scores = [0.9, 0.5, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7]  # best at epoch 2; patience 2 -> stops after epoch 4
    recorder = WeightsPerEpoch()
    early = EarlyStopping(monitor="val_score", patience=2, best_weights_storage=storage)
    model = ScriptedMetric(scores)
    _trainer(tmp_path, [early, recorder], max_epochs=8).fit(model, datamodule=DigitsDataModule())
    assert early.stopped_epoch == 4 and early.best_epoch == 2 and early.restored
    assert set(recorder.weights) == {0, 1, 2, 3, 4}
    assert not torch.equal(recorder.weights[4]["head.weight"], recorder.weights[2]["head.weight"])
    assert_same(snapshot_state(model), recorder.weights[2])
    if storage == "disk":
        assert Path(early.best_weights_path) == tmp_path / "early_stopping" / "best_weights_rank0.pt"
        assert early.best_weights is None


def test_restores_best_at_end_of_fit_without_stopping(tmp_path: Path) -> None:
    recorder = WeightsPerEpoch()
    early = EarlyStopping(monitor="val_score", mode="max", patience=10)
    model = ScriptedMetric([0.1, 0.8, 0.3])
    _trainer(tmp_path, [early, recorder], max_epochs=3).fit(model, datamodule=DigitsDataModule())
    assert early.stopped_epoch == 0 and early.best_epoch == 1
    assert_same(snapshot_state(model), recorder.weights[1])


def test_restore_can_be_disabled(tmp_path: Path) -> None:
    recorder = WeightsPerEpoch()
    model = ScriptedMetric([0.1, 0.8, 0.3])
    early = EarlyStopping(monitor="val_score", mode="max", patience=10, restore_best_weights=False)
    _trainer(tmp_path, [early, recorder], max_epochs=3).fit(model, datamodule=DigitsDataModule())
    assert_same(snapshot_state(model), recorder.weights[2])


def test_real_training_restored_model_scores_the_best_val_loss(tmp_path: Path) -> None:
    """On digits with a too-high learning rate the val loss goes up and down; the returned model is the best one."""
    L.seed_everything(0, verbose=False)
    early = EarlyStopping(monitor="val_loss", patience=2)
    model = DigitsCNN(channels=8, lr=0.03)
    trainer = _trainer(tmp_path, [early], max_epochs=8, limit_train_batches=5, limit_val_batches=None)
    trainer.fit(model, datamodule=DigitsDataModule())
    (result,) = trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    assert result["val_loss"] == pytest.approx(float(early.best_score), rel=1e-5)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_exact_resume_keeps_best_weights_and_score(tmp_path: Path, storage: str) -> None:
    straight = assert_exact_resume(
        lambda: ScriptedMetric([0.9, 0.5, 0.7, 0.2, 0.6, 0.6]),
        DigitsDataModule,
        lambda: [EarlyStopping(monitor="val_score", patience=3, best_weights_storage=storage)],
        tmp_path,
        total_steps=18,
        split_step=7,  # mid-epoch: best weights of epoch 1 must come back from the checkpoint
        trainer_kwargs=dict(limit_train_batches=3, limit_val_batches=1, default_root_dir=str(tmp_path / "run")),
    )
    early = straight["callbacks"][0]
    assert early.best_epoch == 3 and early.restored


def test_loads_a_lightning_earlystopping_state() -> None:
    from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

    theirs = LightningEarlyStopping(monitor="val_loss")
    ours = EarlyStopping(monitor="val_loss")
    assert ours.state_key == theirs.state_key
    ours.load_state_dict(theirs.state_dict())
    assert ours.best_weights is None and ours.best_epoch == -1


def test_missing_disk_file_on_resume_is_a_clear_error(tmp_path: Path) -> None:
    early = EarlyStopping(monitor="val_loss", best_weights_storage="disk")
    state = early.state_dict()
    state["best_weights_path"] = str(tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match="restore_best_weights=False"):
        early.load_state_dict(state)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="best_weights_storage='gpu' is not allowed"):
        EarlyStopping(best_weights_storage="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='median' is not allowed"):
        EarlyStopping(mode="median")
    with pytest.raises(ValueError, match="patience must be a non-negative integer"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="best_weights_dir is only used"):
        EarlyStopping(best_weights_dir="/tmp/x")


def test_missing_monitor_fails_before_training_goes_on(tmp_path: Path) -> None:
    early = EarlyStopping(monitor="nope")
    with pytest.raises(RuntimeError, match="nope"):
        _trainer(tmp_path, [early], max_epochs=1).fit(DigitsCNN(channels=4), datamodule=DigitsDataModule())
