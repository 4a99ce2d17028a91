"""Adapters (Houlsby et al. 2019): near-identity at init, only the adapters (and ``train_also``) train and reach the
optimizer, the base is restored to trainable after fit, a second task is learned; bad input."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques.demo import DigitsCNN, TabularMLP, TinyTransformer
from lightning_techniques.finetune.adapters import (
    ADAPTER_NAME,
    Adapters,
    BottleneckAdapter,
    adapter_size,
    add_adapters,
    remove_adapters,
)


def _digits(classes: range) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    keep = torch.isin(y, torch.tensor(list(classes)))
    return x[keep], y[keep]


def _loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def _trainer(steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def test_adapter_is_identity_at_init_and_the_module_pickles() -> None:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4)
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    paths = add_adapters(model, ["features.0", "features.5", "head"], bottleneck=3, init_std=0.0)
    assert paths == ["features.0", "features.5", "head"]
    assert torch.equal(model(x), before), "init_std=0: exactly the identity"
    assert adapter_size(model.features[0]) == (4, 1) and adapter_size(model.head) == (10, -1)
    torch.save(model, io.BytesIO())
    # the base layers' state_dict keys are unchanged; the adapters add their own
    keys = set(model.state_dict())
    assert {"features.0.weight", "head.weight", f"head.{ADAPTER_NAME}.down.weight"} <= keys
    assert remove_adapters(model) == paths and torch.equal(model(x), before)
    assert not any(ADAPTER_NAME in k for k in model.state_dict())
    assert not model.features[0]._forward_hooks

    near = DigitsCNN(channels=4)
    reference = near(x)
    add_adapters(near, ["features.0"], init_std=1e-3)
    assert torch.allclose(near(x), reference, atol=1e-2) and not torch.equal(near(x), reference)


def test_adapter_on_a_transformer_block_and_a_conv_is_residual_bottleneck() -> None:
    adapter = BottleneckAdapter(6, 2, "gelu", dim=1, init_std=0.1, generator=torch.Generator().manual_seed(1))
    h = torch.randn(2, 6, 3, 3)
    expected = h + adapter.up(adapter.act(adapter.down(h.movedim(1, -1)))).movedim(-1, 1)
    assert torch.allclose(adapter(h), expected)
    model = TinyTransformer(d_model=16, heads=2)
    add_adapters(model, ["blocks.0", "blocks.1.attn"], bottleneck=4)
    assert adapter_size(model.blocks[0]) == (16, -1)  # the block ends in its MLP's last Linear
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_only_adapters_and_train_also_train_and_the_second_task_is_learned() -> None:
    L.seed_everything(0, verbose=False)
    xa, ya = _digits(range(0, 5))
    xb, yb = _digits(range(5, 10))
    xa, xb, yb = xa.flatten(1), xb.flatten(1), yb - 5  # task B: digits 5-9 as classes 0-4
    model = TabularMLP(in_features=64, num_classes=5, hidden=32, lr=3e-3)
    _trainer(60, []).fit(model, train_dataloaders=_loader(xa, ya))  # pre-train on digits 0-4
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = _accuracy(model, xb, yb)

    model.lr = 2e-2  # the user's own fine-tuning LR (configure_optimizers reads it)
    callback = Adapters(targets=["net.0", "net.2"], bottleneck=8, train_also=["net.4"])
    trainer = _trainer(40, [callback])
    trainer.fit(model, train_dataloaders=_loader(xb, yb))  # fine-tune on digits 5-9
    after = _accuracy(model, xb, yb)
    assert callback.changed_paths == ("net.0", "net.2")
    assert after > before + 0.3, f"second-task accuracy {before:.2f} -> {after:.2f}"

    state = model.state_dict()
    for key, value in base.items():
        if key.startswith("net.4."):
            assert not torch.equal(state[key], value), f"{key} (train_also) did not train"
        else:
            assert torch.equal(state[key], value), f"{key} is frozen but changed"
    assert state[f"net.0.{ADAPTER_NAME}.up.weight"].abs().max() > 1e-2, "the adapter did not train (init 1e-3)"
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {id(p) for n, p in model.named_parameters() if ADAPTER_NAME in n or n.startswith("net.4.")}
    assert optimized == trainable, "only the adapters and the head reach the optimizer"
    # after fit: the adapters stay (declared change), every base parameter is trainable again as before
    assert all(p.requires_grad for p in model.parameters())


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="bottleneck"):
        Adapters(targets=["head"], bottleneck=0)
    with pytest.raises(ValueError, match="activation"):
        Adapters(targets=["head"], activation="swish")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets"):
        Adapters(targets=[])
    model = DigitsCNN(channels=4)
    with pytest.raises(ValueError, match=r"nope.*features\.0"):
        _trainer(1, [Adapters(targets=["nope"])]).fit(model, train_dataloaders=_loader(*_digits(range(2))))
    assert not any(ADAPTER_NAME in k for k in model.state_dict()), "nothing half-applied"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="size"):
        adapter_size(nn.ReLU())


@pytest.mark.parametrize("name", ["Adapters", "ReLoRA", "AdaLoRA", "PromptTuning", "PrefixTuning"])
def test_evaluate_a_fresh_module_from_an_adapted_checkpoint(name: str, tmp_path: Path) -> None:
    """``trainer.test(fresh_module, ckpt_path=...)`` with the technique attached: it makes the same change before the
    checkpoint loads, so the adapted weights load strictly and the fresh module computes what the trained one does."""
    from lightning_techniques import registry

    entry = registry.BY_NAME[name]
    recipe = entry.recipe
    assert recipe is not None
    L.seed_everything(0, verbose=False)
    trained = recipe.build_module()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[entry.build()], default_root_dir=str(tmp_path))
    trainer.fit(trained, datamodule=recipe.build_data())
    trainer.save_checkpoint(tmp_path / "adapted.ckpt")
    fresh = recipe.build_module()
    evaluator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_test_batches=1, callbacks=[entry.build()], default_root_dir=str(tmp_path))
    evaluator.test(fresh, datamodule=recipe.build_data(), ckpt_path=str(tmp_path / "adapted.ckpt"), weights_only=True)
    assert set(fresh.state_dict()) == set(trained.state_dict())
    batch = _first_batch(recipe)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(trained(batch), fresh(batch), atol=1e-6)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if "ranknum" not in n), "nothing frozen"


def _first_batch(recipe: Any) -> torch.Tensor:
    data = recipe.build_data()
    data.setup("test")
    return next(iter(data.test_dataloader()))[0]
