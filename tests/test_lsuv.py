"""LSUV initialisation: the core against its definition, the effect in training, resume, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import LSUVInit
from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule
from lightning_techniques.functional import lsuv_init
from lightning_techniques.init.lsuv import select_layers
from lightning_techniques.testing import assert_exact_resume


def _digits_batch(n: int = 256) -> torch.Tensor:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm.train_dataset.inputs[:n]


def _output_variances(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    found: dict[str, float] = {}

    def hook(name: str):
        def record(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            found.setdefault(name, float(out.var()))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in select_layers(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def test_core_gives_unit_variance_outputs_on_deep_mlp() -> None:
    torch.manual_seed(0)
    model = DeepMLP(depth=20)
    x = _digits_batch()
    before = _output_variances(model, x)
    assert before["net.37"] < 0.2 * before["net.1"], "the default init shrinks activations through 20 ReLU layers"
    reports = lsuv_init(model, x, tolerance=0.05)
    after = _output_variances(model, x)
    assert len(reports) == 20 and all(r.converged for r in reports)
    assert all(abs(v - 1.0) < 0.05 for v in after.values()), after
    assert [r.layer for r in reports][:3] == ["net.1", "net.3", "net.5"], "layers are processed in forward order"


def test_core_orthogonal_preinit_and_center_bias() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    model = nn.Sequential(layer)
    x = torch.randn(512, 16) * 3 + 2
    lsuv_init(model, x, tolerance=0.01, center_bias=True)
    w = layer.weight.detach()
    gram = w @ w.T
    assert torch.allclose(gram / gram.diagonal().mean(), torch.eye(16), atol=1e-4), "orthogonal rows (scaled)"
    with torch.no_grad():
        out = model(x)
    assert abs(float(out.var()) - 1.0) < 0.01 and abs(float(out.mean())) < 0.05


def test_core_restores_mode_and_handles_forward_fn_and_unused_layers() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) + y)

    model = TwoInputs().train()
    inputs = {"x": torch.randn(64, 4), "y": torch.randn(64, 4)}
    with pytest.warns(UserWarning, match="never called"):
        reports = lsuv_init(model, inputs, forward_fn=lambda m, b: m(b["x"], b["y"]))
    assert [r.layer for r in reports] == ["a", "b"] and model.training


def test_core_no_matching_layer_lists_layers() -> None:
    with pytest.raises(ValueError, match=r"Layers in the model: \['0 \(ReLU\)'\]"):
        lsuv_init(nn.Sequential(nn.ReLU()), torch.randn(2, 3))


class FirstStepVariance(Callback):
    """Measures the layer output variances on the first batch, right before training_step runs."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and trainer.global_step == 0:
            self.variances = _output_variances(pl_module, batch[0])


def _trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(**base)


def test_callback_initialises_on_first_batch_and_logs_report(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    lsuv, probe = LSUVInit(tolerance=0.1), FirstStepVariance()
    _trainer(max_steps=2, callbacks=[lsuv, probe], default_root_dir=str(tmp_path)).fit(
        DeepMLP(depth=20), datamodule=DigitsDataModule()
    )
    assert lsuv.done and len(lsuv.report) == 20
    assert all(abs(v - 1.0) < 0.1 for v in probe.variances.values()), probe.variances
    report = tmp_path / "artifacts" / "lsuv" / "report_step0000000.csv"
    assert report.exists() and report.read_text().startswith("layer,variance_before,variance_after")


@pytest.mark.slow
def test_lsuv_beats_default_init_on_a_deep_mlp() -> None:
    """Side by side, same seed and data: after 100 SGD steps the 20-layer MLP has learned with LSUV, not without."""

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.values.append(float(outputs["loss"]))

    final = {}
    for name, extra in (("default", []), ("lsuv", [LSUVInit()])):
        L.seed_everything(0, verbose=False)
        losses = Losses()
        _trainer(max_steps=100, callbacks=extra + [losses]).fit(DeepMLP(depth=20), datamodule=DigitsDataModule())
        final[name] = sum(losses.values[-10:]) / 10
    assert final["default"] > 2.25, "default init stays at chance (ln 10 = 2.30)"
    assert final["lsuv"] < final["default"] - 0.15, final


def test_exact_resume_never_reinitialises(tmp_path: Path) -> None:
    straight = assert_exact_resume(
        lambda: DeepMLP(depth=6), DigitsDataModule, lambda: [LSUVInit()], tmp_path, total_steps=10, split_step=5
    )
    assert straight["callbacks"][0].done


def test_resume_from_a_checkpoint_without_lsuv_state_keeps_checkpoint_weights(tmp_path: Path) -> None:
    model = DigitsCNN(channels=4)
    trainer = _trainer(max_steps=2)
    trainer.fit(model, datamodule=DigitsDataModule())
    ckpt = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    class Probe(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if not hasattr(self, "weights"):
                self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}

    probe, lsuv = Probe(), LSUVInit()
    _trainer(max_steps=3, callbacks=[lsuv, probe]).fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(),
                                                       ckpt_path=str(ckpt), weights_only=True)
    assert all(torch.equal(saved[k], probe.weights[k]) for k in saved) and lsuv.report == []


def test_bad_arguments_and_misuse() -> None:
    with pytest.raises(ValueError, match=r"tolerance must be a number in \(0.0, 1.0\)"):
        LSUVInit(tolerance=0)
    with pytest.raises(TypeError, match="max_iterations must be an integer"):
        LSUVInit(max_iterations=2.5)
    with pytest.raises(ValueError, match="layer_types: cannot import layer type 'torch.nn.Nope'"):
        LSUVInit(layer_types=["torch.nn.Nope"])
    assert LSUVInit(layer_types=["Linear"]).layer_types == (nn.Linear,)
    with pytest.raises(ValueError, match="no layer matches .* Layers in the model"):
        _trainer(max_steps=1, callbacks=[LSUVInit(include=["decoder.*"])]).fit(
            DigitsCNN(channels=4), datamodule=DigitsDataModule()
        )


def test_no_training_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="limit_train_batches=0"):
        _trainer(max_steps=1, limit_train_batches=0, callbacks=[LSUVInit()]).fit(
            DigitsCNN(channels=4), datamodule=DigitsDataModule()
        )


def test_batch_without_input_is_a_clear_error() -> None:
    class DictModel(DigitsCNN):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(self(batch["pixels"]), batch["y"])

    class DictData(DigitsDataModule):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return {"pixels": batch[0], "y": batch[1]}

    with pytest.raises(ValueError, match="Pass input_key"):
        _trainer(max_steps=1, callbacks=[LSUVInit()]).fit(DictModel(channels=4), datamodule=DictData())
    lsuv = LSUVInit(input_key="pixels")
    _trainer(max_steps=1, callbacks=[lsuv]).fit(DictModel(channels=4), datamodule=DictData())
    assert lsuv.done and len(lsuv.report) == 4
