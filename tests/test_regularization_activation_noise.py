"""ActivationNoise / ActivationDropout: noise only in training batches, its statistics (additive, multiplicative,
scheduled), dropout rate and scaling, hooks removed after fit and after an exception, bad input."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques import ActivationDropout, ActivationNoise
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.functional import activation_noise, dropout_mask


class _Probe(L.LightningModule):
    """A fixed linear layer (lr 0): records ``layer(x) - clean`` in every training and validation step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(16, 256)
        self.other = nn.Linear(256, 1)
        self.train_delta: list[torch.Tensor] = []
        self.train_clean: list[torch.Tensor] = []
        self.val_delta: list[torch.Tensor] = []

    def _delta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.layer(x)
        clean = F.linear(x, self.layer.weight, self.layer.bias)
        return out, clean

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out, clean = self._delta(batch[0])
        self.train_delta.append((out - clean).detach())
        self.train_clean.append(clean.detach())
        return self.other(out).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out, clean = self._delta(batch[0])
        self.val_delta.append(out - clean)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(256, 16)), batch_size=64)


def _fit(callbacks: list[Any], module: L.LightningModule, data: Any = None, **kw: Any) -> L.Trainer:
    args: dict[str, Any] = {"max_steps": 4, "logger": False, "enable_checkpointing": False,
                            "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
                            "devices": 1, "num_sanity_val_steps": 0}
    args.update(kw)
    trainer = L.Trainer(callbacks=callbacks, **args)
    if data is None:
        trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader())
    else:
        trainer.fit(module, datamodule=data)
    return trainer


def test_core_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 2.0)
    noisy = activation_noise(x, 0.3, "additive", gen)
    assert abs(float((noisy - x).std()) - 0.3) < 0.005 and abs(float((noisy - x).mean())) < 0.005
    rel = activation_noise(x, 0.3, "multiplicative", gen)
    assert abs(float((rel / x - 1).std()) - 0.3) < 0.005
    mask = dropout_mask((200_000,), 0.25, gen)
    assert abs(float((mask == 0).float().mean()) - 0.25) < 0.005
    assert torch.allclose(mask[mask > 0], torch.tensor(1 / 0.75))


def test_noise_only_in_training_with_the_right_std(tmp_path: Any) -> None:
    module = _Probe()
    noise = ActivationNoise(targets=["layer"], std=0.2, seed=3)
    _fit([noise], module, val_check_interval=2, limit_val_batches=1, default_root_dir=str(tmp_path))
    deltas = torch.cat(module.train_delta)
    assert len(module.train_delta) == 4
    assert abs(float(deltas.std()) - 0.2) < 0.01 and abs(float(deltas.mean())) < 0.01
    assert module.val_delta and all(torch.equal(d, torch.zeros_like(d)) for d in module.val_delta)
    assert not torch.equal(module.train_delta[0], module.train_delta[1])  # fresh noise each batch
    assert noise.hooked_layers == ["layer"]
    assert not module.layer._forward_hooks  # removed at teardown


def test_multiplicative_noise_and_schedule(tmp_path: Any) -> None:
    module = _Probe()
    noise = ActivationNoise(targets=["layer"], std=0.4, final_std=0.0, schedule="linear", schedule_steps=4,
                            mode="multiplicative", seed=1)
    _fit([noise], module, default_root_dir=str(tmp_path))
    for step, (delta, clean) in enumerate(zip(module.train_delta, module.train_clean)):
        expected = 0.4 * (1 - step / 4)
        assert abs(float((delta / clean).std()) - expected) < 0.02, step
    assert noise.current_std == pytest.approx(0.1)


def test_noise_is_reproducible_and_seeded(tmp_path: Any) -> None:
    runs = []
    for seed in (5, 5, 6):
        module = _Probe()
        _fit([ActivationNoise(targets=["layer"], std=0.1, seed=seed)], module, max_steps=2,
             default_root_dir=str(tmp_path))
        runs.append(torch.cat(module.train_delta))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_dropout_after_chosen_layers_only_in_training(tmp_path: Any) -> None:
    module = _Probe()
    drop = ActivationDropout(targets=["layer"], p=0.3, seed=0)
    _fit([drop], module, val_check_interval=2, limit_val_batches=1, default_root_dir=str(tmp_path))
    for delta, clean in zip(module.train_delta, module.train_clean):
        out = clean + delta
        dropped = out == 0
        assert 0.25 < float(dropped.float().mean()) < 0.35
        torch.testing.assert_close(out[~dropped], clean[~dropped] / 0.7)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in module.val_delta)
    assert drop.hooked_layers == ["layer"] and not module.layer._forward_hooks


def test_hooks_removed_after_an_exception(tmp_path: Any) -> None:
    class _Boom(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            raise RuntimeError("boom")

    module = DigitsCNN(channels=4)
    with pytest.raises(RuntimeError, match="boom"):
        _fit([ActivationNoise(targets=["ReLU"], std=0.1), ActivationDropout(targets=["features.5"], p=0.2), _Boom()],
             module, DigitsDataModule(batch_size=16), default_root_dir=str(tmp_path))
    assert all(not m._forward_hooks for m in module.modules())


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (ActivationNoise, {"targets": ["layer"], "std": -0.1}, ValueError, "std"),
    (ActivationNoise, {"targets": ["layer"], "final_std": -1.0}, ValueError, "final_std"),
    (ActivationNoise, {"targets": ["layer"], "mode": "relative"}, ValueError, "mode"),
    (ActivationNoise, {"targets": ["layer"], "schedule": "cosine", "std": 0.0, "schedule_steps": 0}, ValueError,
     "schedule_steps"),
    (ActivationNoise, {"targets": []}, ValueError, "targets"),
    (ActivationDropout, {"targets": ["layer"], "p": 1.0}, ValueError, "p must be"),
    (ActivationDropout, {"targets": ["layer"], "p": -0.1}, ValueError, "p must be"),
    (ActivationDropout, {"targets": "layer", "seed": -1}, ValueError, "seed"),
])
def test_bad_input(cls: type, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_targets_matching_nothing_list_the_layers(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="'conv9' matches no layer; the model has: .*features.0 \\(Conv2d\\)"):
        _fit([ActivationNoise(targets=["conv9"])], DigitsCNN(channels=4), DigitsDataModule(batch_size=16),
             default_root_dir=str(tmp_path))
