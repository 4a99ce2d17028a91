"""TSNELogger and AttentionMapLogger: attention weights against a hand computation from q/k projections, outputs
bit-identical with and without capture, t-SNE class separation, integration on the demo, exact resume, bad input.
(The DDP run of these loggers is in tests/ddp/ddp_eval_embed.py, launched from tests/test_evaluation.py.)"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn

from lightning_techniques import AttentionMapLogger, TSNELogger
from lightning_techniques._internal.eval_grad import describe_modes
from lightning_techniques.demo.data import DigitsDataModule
from lightning_techniques.demo.models import DeepMLP, DigitsCNN, TinyTransformer
from lightning_techniques.interpret.attention import (
    AttentionCapture,
    attention_from_qk,
    attention_grid_image,
    attention_maps,
    find_attention_layers,
    plot_attention,
)
from lightning_techniques.interpret.tsne import default_embedding_layer, knn_accuracy, tsne_embedding
from lightning_techniques.testing import assert_exact_resume

warnings.filterwarnings("ignore", ".*LeafSpec.*")


def _trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                callbacks=callbacks, deterministic=True)
    base.update(kw)
    return L.Trainer(**base)


# ----------------------------------------------------------------------------------------------- attention: unit
def test_sdpa_attention_equals_hand_computation_and_reproduces_output() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(d_model=16, heads=2).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        reference_out = model(x)
        with AttentionCapture(model) as capture:
            captured_out = model(x)
        # by hand: block 0's input, its pre-norm, the q/k projections, softmax(q k^T / sqrt(d_head)) per head
        h = model.embed(x.reshape(3, 8, 8)) + model.pos
        block = model.blocks[0]
        n = block.norm1(h)
        q = n @ block.attn.q_proj.weight.T + block.attn.q_proj.bias
        k = n @ block.attn.k_proj.weight.T + block.attn.k_proj.bias
        v = n @ block.attn.v_proj.weight.T + block.attn.v_proj.bias
        qh, kh, vh = (t.reshape(3, 8, 2, 8).transpose(1, 2) for t in (q, k, v))
        by_hand = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(8), dim=-1)
        sdpa_out = block.attn(n)
    assert torch.equal(reference_out, captured_out)  # the capture changes nothing
    assert set(capture.maps) == {"blocks.0.attn", "blocks.1.attn"}
    weights = capture.maps["blocks.0.attn"][0]
    assert weights.shape == (3, 2, 8, 8)
    torch.testing.assert_close(weights, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 8), atol=1e-6, rtol=0)
    # the weights are the ones SDPA used: weights @ v through out_proj gives the layer's output
    mixed = (weights @ vh).transpose(1, 2).reshape(3, 8, 16)
    torch.testing.assert_close(block.attn.out_proj(mixed), sdpa_out, atol=1e-5, rtol=0)
    assert not any(m._forward_hooks for m in model.modules())  # every hook removed


def test_causal_weights_match_sdpa_causal() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w = attention_from_qk(q, k, heads=2, causal=True)
    assert torch.all(w.triu(diagonal=1) == 0)
    split = lambda t: t.reshape(2, 5, 2, 4).transpose(1, 2)  # noqa: E731
    expected = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    torch.testing.assert_close(w @ split(v), expected, atol=1e-5, rtol=0)


class _MHAModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(12, 3, batch_first=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(x, x, x, need_weights=False)
        return self.head(out.mean(1))


def test_multihead_attention_side_call() -> None:
    torch.manual_seed(0)
    model = _MHAModel().eval()
    x = torch.randn(4, 6, 12)
    with torch.no_grad():
        plain = model(x)
        maps = attention_maps(model, x)
        again = model(x)
        _, own = model.mha(x, x, x, need_weights=True, average_attn_weights=False)
        wq, wk, _ = model.mha.in_proj_weight.chunk(3)
        bq, bk, _ = model.mha.in_proj_bias.chunk(3)
        by_hand = attention_from_qk(x @ wq.T + bq, x @ wk.T + bk, heads=3)
    assert torch.equal(plain, again)
    assert list(maps) == ["mha"] and maps["mha"].shape == (4, 3, 6, 6)
    torch.testing.assert_close(maps["mha"], own, atol=0, rtol=0)
    torch.testing.assert_close(maps["mha"], by_hand, atol=1e-5, rtol=0)
    image = attention_grid_image(maps, sample=1)
    assert image.shape == (48, 3 * 48 + 2 * 2, 3) and image.dtype.name == "uint8"
    fig = plot_attention(maps, sample=1, heads=[0, 2], token_labels=[f"t{i}" for i in range(6)])
    plots = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]
    assert len(plots) == 2 and len(fig.axes) == 3  # two heads and one shared colorbar
    assert plots[0].get_ylabel() == "mha\nquery" and [ax.get_xlabel() for ax in plots] == ["key", "key"]
    assert [t.get_text() for t in plots[0].get_xticklabels()] == [f"t{i}" for i in range(6)]
    assert [t.get_text() for t in plots[0].get_yticklabels()] == [f"t{i}" for i in range(6)]
    assert fig.axes[2]._colorbar.ax.get_ylabel() == "attention weight"


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_fast_path_is_recorded(norm_first: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(8, 17, 64)
    with torch.inference_mode():  # Lightning's evaluation: PyTorch takes its fused path
        plain = encoder(x)
        with AttentionCapture(encoder) as capture:
            captured = encoder(x)
        torch.backends.mha.set_fastpath_enabled(False)
        unfused = encoder(x)
        torch.backends.mha.set_fastpath_enabled(True)
    assert not torch.equal(plain, unfused)  # so a hook inside the layers (which disables the fused path) would show
    assert torch.equal(plain, captured)  # ... but the capture leaves the outputs bit-identical
    # reference: run the layers by hand (slow path) and ask each self_attn for its weights
    with torch.no_grad():
        h, expected = x, []
        for mod in encoder.layers:
            a = mod.norm1(h) if norm_first else h
            expected.append(mod.self_attn(a, a, a, need_weights=True, average_attn_weights=False)[1])
            h = mod(h)
    for i in range(2):
        got = capture.maps[f"layers.{i}.self_attn"]
        assert len(got) == 1
        torch.testing.assert_close(got[0], expected[i], atol=1e-5, rtol=0)
    # a lone encoder layer is hooked directly
    lone = encoder.layers[0]
    with torch.inference_mode(), AttentionCapture(lone) as capture:
        lone(x)
    torch.testing.assert_close(capture.maps["self_attn"][0], expected[0], atol=1e-5, rtol=0)


def test_attention_layer_errors_name_what_exists(tmp_path: Path) -> None:
    model = TinyTransformer(d_model=16, heads=2)
    assert list(find_attention_layers(model)) == ["blocks.0.attn", "blocks.1.attn"]
    trainer = _trainer(tmp_path, [AttentionMapLogger(layers=["blocks.5.attn"])], max_steps=1)
    with pytest.raises(ValueError, match=r"'blocks.5.attn' matches no layer.*\['blocks.0.attn', 'blocks.1.attn'\]"):
        trainer.fit(model, datamodule=DigitsDataModule())
    trainer = _trainer(tmp_path, [AttentionMapLogger(layers=["blocks.0.norm1"])], max_steps=1)
    with pytest.raises(ValueError, match="is not an attention layer"):
        trainer.fit(model, datamodule=DigitsDataModule())
    trainer = _trainer(tmp_path, [AttentionMapLogger()], max_steps=1)
    with pytest.raises(ValueError, match="has no attention layer"):
        trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule())
    trainer = _trainer(tmp_path, [AttentionMapLogger(heads=[0, 7])], max_steps=1)
    with pytest.raises(ValueError, match=r"heads \[7\] do not exist"):
        trainer.fit(model, datamodule=DigitsDataModule())
    with pytest.raises(TypeError, match="layers"):
        AttentionMapLogger(layers="blocks.0.attn")
    with pytest.raises(ValueError, match="num_samples"):
        AttentionMapLogger(num_samples=0)


# ----------------------------------------------------------------------------------------------- attention: integration
def _fit_transformer(tmp_path: Path, callbacks: list) -> TinyTransformer:
    L.seed_everything(0)
    model = TinyTransformer(d_model=16, heads=2)
    model.embed.requires_grad_(False)  # a frozen part, whose flags must survive
    trainer = _trainer(tmp_path, callbacks, max_steps=4, val_check_interval=2, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    trainer.test(model, datamodule=DigitsDataModule(), verbose=False)
    return model


def test_attention_logger_integration(tmp_path: Path) -> None:
    logger = AttentionMapLogger(every_n_val_epochs=2, num_samples=2, heads=[1])
    with_logger = _fit_transformer(tmp_path / "a", [logger])
    plain = _fit_transformer(tmp_path / "b", [])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, with_logger.state_dict()[key]), key
    assert describe_modes(plain) == describe_modes(with_logger)  # train/eval modes and requires_grad untouched
    assert not with_logger.embed.weight.requires_grad
    # the logged maps are those of the first test batch, with the trained weights
    dm = DigitsDataModule()
    dm.setup("test")
    x = dm.test_dataset.inputs[:2]
    with_logger.eval()
    expected = attention_maps(with_logger, x)
    assert set(logger.last_maps) == {"blocks.0.attn", "blocks.1.attn"}
    for name, maps in logger.last_maps.items():
        assert maps.shape == (2, 2, 8, 8)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 8), atol=1e-6, rtol=0)
        torch.testing.assert_close(maps, expected[name], atol=1e-6, rtol=0)
    files = sorted(p.name.split("_step")[0] for p in (tmp_path / "a" / "artifacts" / "attention").iterdir())
    assert files.count("val_sample0") == 1  # validation at step 2 skipped, step 4 logged (every 2nd)
    assert {"test_sample0", "test_sample1", "test_blocks.0.attn", "test_blocks.1.attn"} <= set(files)


# ----------------------------------------------------------------------------------------------- t-SNE
def test_knn_accuracy_by_hand() -> None:
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [5.0, 5.1]])
    assert knn_accuracy(points, torch.tensor([0, 0, 0, 1, 1, 1]), k=2) == 1.0
    line = torch.tensor([[0.0], [1.0], [2.1], [3.3]])  # every nearest neighbour has the other label
    assert knn_accuracy(line, torch.tensor([0, 1, 0, 1]), k=1) == 0.0


def test_tsne_separates_digit_classes() -> None:
    data = load_digits()
    x, y = torch.tensor(data.data[:300], dtype=torch.float32), torch.tensor(data.target[:300])
    points = tsne_embedding(x, perplexity=30, seed=0, max_iter=300)
    assert points.shape == (300, 2)
    assert knn_accuracy(points, y) > 0.85  # chance is ~0.1
    shuffled = y[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert knn_accuracy(points, shuffled) < 0.3
    with pytest.raises(ValueError, match="at least 4"):
        tsne_embedding(x[:3])


def test_tsne_logger_integration_with_tensorboard(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = DeepMLP(depth=3, width=32)
    assert default_embedding_layer(model) == "net.5"  # the last Linear: its input is the penultimate embedding
    # the input of net.1 (the first Linear, after Flatten) is the raw pixels: t-SNE must separate the digits there
    tsne_cb = TSNELogger(layer="net.1", every_n_val_epochs=1, on_test=False, max_samples=200, max_iter=300)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    dm = DigitsDataModule()
    trainer = _trainer(tmp_path, [tsne_cb], max_steps=2, val_check_interval=2, logger=logger)
    trainer.fit(model, datamodule=dm)
    last = tsne_cb.last
    assert last["points"].shape == (200, 2)
    assert torch.equal(torch.as_tensor(last["labels"]), dm.val_dataset.targets[:200])
    assert last["knn_accuracy"] > 0.8
    log_dir = Path(logger.log_dir)
    assert (log_dir / "projector_config.pbtxt").exists()
    names = {p.name.split("_step")[0] for p in (log_dir / "artifacts" / "tsne").iterdir()}
    assert {"val", "val_points", "val_labels"} <= names
    assert not model.net[1]._forward_pre_hooks  # hook removed


def test_tsne_logger_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="every_n_val_epochs"):
        TSNELogger(every_n_val_epochs=2.5)
    with pytest.raises(ValueError, match="max_iter"):
        TSNELogger(max_iter=10)
    with pytest.raises(TypeError, match="layer"):
        TSNELogger(layer=3)
    trainer = _trainer(tmp_path, [TSNELogger(layer="net.99")], max_steps=1)
    with pytest.raises(ValueError, match=r"'net.99' is not in DeepMLP. Its Linear layers are \['net.1', 'net.3'\]"):
        trainer.fit(DeepMLP(depth=2, width=8), datamodule=DigitsDataModule())


def test_interpret_loggers_exact_resume(tmp_path: Path) -> None:
    assert_exact_resume(
        lambda: TinyTransformer(d_model=16, heads=2),
        lambda: DigitsDataModule(batch_size=64),
        lambda: [TSNELogger(every_n_val_epochs=4, max_samples=40, max_iter=250),
                 AttentionMapLogger(every_n_val_epochs=2, num_samples=1)],
        tmp_path,
        total_steps=8,
        split_step=3,  # not followed by a validation (see tests/test_evaluation.py::test_report_exact_resume)
        trainer_kwargs={"val_check_interval": 2, "limit_val_batches": 1},
    )
