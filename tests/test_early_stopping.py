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


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
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


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
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


# ---------------------------------------------------------------- drop-in for Lightning's EarlyStopping
def test_bad_arguments_are_caught_as_misconfiguration_like_lightnings() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for kwargs in (dict(mode="median"), dict(patience=-1), dict(patience=2.5), dict(best_weights_storage="gpu"),
                   dict(min_delta="0.1"), dict(min_delta=float("nan")), dict(stopping_threshold="low"),
                   dict(best_weights_dir="/tmp/x")):
        with pytest.raises(MisconfigurationException):
            EarlyStopping(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patience must be a non-negative integer"):
        EarlyStopping(patience=-1)
    with pytest.raises(TypeError, match="min_delta must be a real number"):
        EarlyStopping(min_delta="0.1")  # type: ignore[arg-type]


def test_accepts_numpy_numbers_like_lightning() -> None:
    import numpy as np

    early = EarlyStopping(monitor="val_loss", patience=np.int64(4), min_delta=np.float32(0.5),
                          stopping_threshold=np.float64(0.1))
    assert early.patience == 4 and type(early.patience) is int
    assert early.min_delta == -0.5 and early.stopping_threshold == pytest.approx(0.1)


class Float64Metric(ScriptedMetric):
    def on_validation_epoch_end(self) -> None:
        epoch = min(self.current_epoch, len(self.scores) - 1)
        self.log("val_score", torch.tensor(self.scores[epoch], dtype=torch.float64))


def test_float64_metric_is_compared_at_its_own_precision(tmp_path: Path) -> None:
    """1 - 1e-9 is below 1.0 in float64 but equal in float32: it must count as an improvement."""
    recorder = WeightsPerEpoch()
    early = EarlyStopping(monitor="val_score", patience=5)
    model = Float64Metric([1.0, 1.0 - 1e-9, 1.0])
    _trainer(tmp_path, [early, recorder], max_epochs=3).fit(model, datamodule=DigitsDataModule())
    assert early.best_score.dtype == torch.float64 and float(early.best_score) == 1.0 - 1e-9
    assert early.best_epoch == 1 and early.wait_count == 1
    assert_same(snapshot_state(model), recorder.weights[1])


def test_resume_from_a_lightning_earlystopping_checkpoint(tmp_path: Path) -> None:
    """The state of Lightning's own EarlyStopping loads (best score, wait count); with no better score after the
    resume the warning says why there are no weights - not that nothing was ever recorded."""
    import warnings

    from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

    ckpt = tmp_path / "lightning_es.ckpt"
    first = _trainer(tmp_path, [LightningEarlyStopping(monitor="val_score", patience=10)], max_epochs=2)
    first.fit(ScriptedMetric([0.5, 0.2]), datamodule=DigitsDataModule())
    first.save_checkpoint(ckpt)

    ours = EarlyStopping(monitor="val_score", patience=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [ours], max_epochs=4).fit(ScriptedMetric([0.5, 0.2, 0.6, 0.7]),
                                                     datamodule=DigitsDataModule(), ckpt_path=str(ckpt),
                                                     weights_only=True)
    messages = [str(w.message) for w in caught if "EarlyStopping" in str(w.message)]
    assert float(ours.best_score) == pytest.approx(0.2) and ours.wait_count == 2
    assert not any("ever recorded" in m for m in messages), messages
    assert any("checkpoint that holds no best weights" in m for m in messages), messages
    assert not ours.restored

    # a better score after the resume is kept and restored as usual
    better = EarlyStopping(monitor="val_score", patience=10)
    recorder = WeightsPerEpoch()
    model = ScriptedMetric([0.5, 0.2, 0.1, 0.7])
    _trainer(tmp_path, [better, recorder], max_epochs=4).fit(model, datamodule=DigitsDataModule(),
                                                             ckpt_path=str(ckpt), weights_only=True)
    assert better.restored and better.best_epoch == 2
    assert_same(snapshot_state(model), recorder.weights[2])


def test_best_copy_is_kept_in_buffers_allocated_once(tmp_path: Path) -> None:
    """Each improvement copies into the same preallocated buffers (no new allocation); the restore is exact."""

    class PointerProbe(Callback):
        def __init__(self, early: EarlyStopping) -> None:
            self.early = early
            self.pointers: dict[int, dict[str, int]] = {}

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # before this epoch's check
            if self.early.best_weights is not None:
                self.pointers[trainer.current_epoch] = {k: v.data_ptr() for k, v in self.early.best_weights.items()}

    scores = [0.9, 0.8, 0.7, 0.6, 0.65]  # four improvements
    early = EarlyStopping(monitor="val_score", patience=5)
    probe, recorder = PointerProbe(early), WeightsPerEpoch()
    model = ScriptedMetric(scores)
    _trainer(tmp_path, [early, probe, recorder], max_epochs=5).fit(model, datamodule=DigitsDataModule())
    # seen after the improvements of epochs 0, 1, 2 and 3 (Lightning runs EarlyStopping's epoch-end hook last)
    assert early.best_epoch == 3 and set(probe.pointers) == {1, 2, 3, 4}
    final = {k: v.data_ptr() for k, v in early.best_weights.items()}
    assert all(p == final for p in probe.pointers.values())
    params = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert not set(params.values()) & set(final.values())  # a copy, not an alias of the weights
    assert_same(snapshot_state(model), recorder.weights[3])


def test_copy_state_into_reuses_or_reallocates() -> None:
    from lightning_techniques.regularization.early_stopping import copy_state_into

    model = nn.Linear(3, 2)
    buffers = copy_state_into(model)
    pointer = buffers["weight"].data_ptr()
    with torch.no_grad():
        model.weight.add_(1.0)
    again = copy_state_into(model, buffers)
    assert again is buffers and buffers["weight"].data_ptr() == pointer
    assert torch.equal(buffers["weight"], model.weight.detach())
    grown = copy_state_into(nn.Linear(4, 2), buffers)  # shapes changed: new buffers
    assert grown["weight"].shape == (2, 4)


@pytest.mark.gpu
def test_device_storage_stays_on_the_gpu(tmp_path: Path) -> None:
    early = EarlyStopping(monitor="val_score", patience=5)
    recorder = WeightsPerEpoch()
    model = ScriptedMetric([0.9, 0.8, 0.85])
    _trainer(tmp_path, [early, recorder], max_epochs=3, accelerator="gpu").fit(model, datamodule=DigitsDataModule())
    assert all(v.is_cuda for v in early.best_weights.values())
    assert all(v.device.type == "cpu" for v in early.state_dict()["best_weights"].values())
    assert_same(snapshot_state(model), recorder.weights[1])


def test_sharded_strategy_is_refused_as_misconfiguration() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class UserFSDP(FSDPStrategy):  # a subclass counts (isinstance, not a name match); no process group needed
        def __init__(self) -> None:
            pass

    trainer = SimpleNamespace(strategy=UserFSDP(), val_check_interval=1.0, check_val_every_n_epoch=1,
                              global_rank=0, default_root_dir=".")
    with pytest.raises(MisconfigurationException, match="does not support UserFSDP"):
        EarlyStopping().setup(trainer, None, "fit")
    EarlyStopping(restore_best_weights=False).setup(trainer, None, "fit")  # without weights it is fine


def test_state_key_is_lightnings_and_follows_a_changed_monitor_or_mode() -> None:
    # formatted once per (monitor, mode), as Lightning reads it for every hook of every step
    from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

    ours = EarlyStopping(monitor="val_loss", mode="min")
    assert ours.state_key == LightningEarlyStopping(monitor="val_loss", mode="min").state_key
    assert ours.state_key is ours.state_key  # the same string object: not formatted again
    ours.monitor, ours.mode = "val_acc", "max"
    assert ours.state_key == LightningEarlyStopping(monitor="val_acc", mode="max").state_key
