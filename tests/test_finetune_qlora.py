"""QLoRA: base nn.Linear weights really packed to 4 bits on the CPU (and on a GPU), their memory against fp32, training
with only the adapters, state loading onto a fresh model, the missing-extra error and a model with no nn.Linear.
Resume, YAML and "nothing but the declared change" come from the registry contract."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_techniques import QLoRA
from lightning_techniques.demo import DeepMLP, DigitsDataModule
from lightning_techniques.demo.models import ClassifierModule
from lightning_techniques.finetune._peft import adapter_parameter_names
from lightning_techniques.functional import base_weight_bytes, quantize_linear_4bit

bnb = pytest.importorskip("bitsandbytes")


def trainer(tmp_path: Path, steps: int, **kwargs: Any) -> L.Trainer:
    base = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1,
                default_root_dir=str(tmp_path))
    base.update(kwargs)
    return L.Trainer(**base)


@pytest.mark.parametrize("double_quant", [True, False])
def test_weights_are_packed_to_4_bits_on_the_cpu_at_most_a_sixth_of_fp32(double_quant: bool) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(16, 256)
    reference = model(x).detach()
    assert quantize_linear_4bit(model, ["0"], double_quant=double_quant) == ["0"]
    layer = model[0]
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cpu"
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 256 * 256 // 2  # two 4-bit codes a byte
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested == double_quant
    quantized, fp32 = base_weight_bytes(model)
    assert fp32 == 256 * 256 * 4 and quantized <= fp32 / 6, (quantized, fp32)
    # NF4 keeps the layer's function close (a few percent of the output scale), not exact
    error = (model(x) - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.15


def _adam_mlp() -> DeepMLP:
    return DeepMLP(depth=3, width=64, lr=0.01, optimizer="adam")


def test_trains_only_the_adapters_and_the_loss_falls(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = _adam_mlp()
    callback = QLoRA(rank=4, alpha=8.0)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

    t = trainer(tmp_path, 40, callbacks=[callback, Record()])
    t.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert callback.changed_paths == ("net.1", "net.3", "net.5")
    params = dict(module.named_parameters())
    held = {id(p) for opt in t.optimizers for g in opt.param_groups for p in g["params"]}
    assert held == {id(params[n]) for n in adapter_parameter_names(module)}
    assert all(isinstance(module.get_submodule(f"{p}.base_layer"), bnb.nn.Linear4bit) for p in callback.changed_paths)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_a_checkpointed_state_loads_onto_a_fresh_base_model(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = _adam_mlp()
    trainer(tmp_path, 3, callbacks=[QLoRA(rank=2, double_quant=False)]).fit(module, datamodule=DigitsDataModule())
    state = module.state_dict()
    assert any(k.endswith("weight.absmax") for k in state)  # the packed weights travel with their quant state
    other = _adam_mlp()  # another random base: every base weight must come from the state
    QLoRA(rank=2, double_quant=False)._apply(other)
    other.load_state_dict(state)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), module.eval()(x))


class _ConvOnly(ClassifierModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_model_without_linear_layers_is_refused_at_setup(tmp_path: Path) -> None:
    module = _ConvOnly()
    t = trainer(tmp_path, 2, callbacks=[QLoRA()])
    with pytest.raises(ValueError, match="no nn.Linear"):
        t.fit(module, datamodule=DigitsDataModule())
    assert t.global_step == 0 and all(p.requires_grad for p in module.parameters())
    assert type(module.net[0]) is nn.Conv2d


def test_missing_bitsandbytes_names_the_finetune_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"lightning_techniques\[finetune\]"):
        QLoRA()


@pytest.mark.parametrize("kwargs, match", [
    ({"quant_type": "int4"}, "quant_type"), ({"compute_dtype": "float8"}, "compute_dtype"),
    ({"double_quant": "yes"}, "double_quant"), ({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"),
    ({"dropout": 1.5}, "dropout"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        QLoRA(**kwargs)


@pytest.mark.gpu
def test_on_a_gpu_the_weights_are_4_bit_on_the_device_and_it_trains(tmp_path: Path) -> None:
    big = nn.Sequential(nn.Linear(256, 256)).cuda()
    quantize_linear_4bit(big, ["0"])
    assert big[0].weight.device.type == "cuda" and big[0].weight.dtype == torch.uint8
    quantized, fp32 = base_weight_bytes(big)
    assert quantized <= fp32 / 6, (quantized, fp32)
    L.seed_everything(0)
    module = _adam_mlp()
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

    t = trainer(tmp_path, 40, accelerator="gpu", callbacks=[QLoRA(rank=4, alpha=8.0, compute_dtype="bfloat16"),
                                                            Record()])
    t.fit(module, datamodule=DigitsDataModule(batch_size=64))
    layer = module.net[1].base_layer
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.absmax.device.type == "cuda"
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_validation_between_training_steps_keeps_the_layers_working(tmp_path: Path) -> None:
    """On CPUs with AVX512-BF16 bitsandbytes would repack a 4-bit weight in place at its first eval-mode forward
    without gradients (a validation loop), which fails for out_features not divisible by 32 (the 10-class head)
    and breaks the next training forward; QLoRA's layers keep the common layout on every CPU."""
    L.seed_everything(0)
    module = _adam_mlp()
    trainer(tmp_path, 4, callbacks=[QLoRA(rank=2)], limit_val_batches=1, val_check_interval=2).fit(
        module, datamodule=DigitsDataModule())
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        module.eval()(x)
    module.train()(x).sum().backward()  # training after an eval-mode forward without gradients
