"""AttentionCapture / AttentionMapLogger on Hugging Face ``transformers`` models (tiny configs, no download).

The reference is transformers' own ``attn_implementation="eager"`` with ``output_attentions=True`` on the same weights;
the captured model runs SDPA (which returns no weights). Padding masks, causal masks, rotary embeddings and
grouped-query heads are covered by a BERT and a Llama; the model's outputs must be bit-identical with the capture.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaModel,
)
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from lightning_techniques import AttentionMapLogger  # noqa: E402
from lightning_techniques._internal.eval_grad import describe_modes  # noqa: E402
from lightning_techniques.demo import TinyBert, TokenPresenceDataModule  # noqa: E402
from lightning_techniques.interpret._hf_attention import hf_attention_weights  # noqa: E402
from lightning_techniques.interpret.attention import (  # noqa: E402
    AttentionCapture,
    find_attention_layers,
    resolve_attention_layers,
)
from lightning_techniques.testing import build_from_yaml  # noqa: E402

warnings.filterwarnings("ignore", ".*LeafSpec.*")

ROOT = Path(__file__).resolve().parents[1]

VOCAB, LENGTH = 40, 12


def _bert_config(**kw) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=LENGTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def _pair(cls, config):
    """The same weights twice: SDPA (captured) and eager (reference). Each gets its own config object, because
    ``_from_config`` writes the implementation into the config it is given."""
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    return sdpa, eager


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _patch_removed() -> bool:
    return "__getitem__" not in AttentionInterface.__dict__


# ----------------------------------------------------------------------------------------------- unit
def test_bert_sdpa_capture_equals_eager_output_attentions() -> None:
    sdpa, eager = _pair(BertModel, _bert_config())
    ids, mask = _padded_batch()
    names = list(find_attention_layers(sdpa))
    assert names == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        plain = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        with AttentionCapture(sdpa) as capture:
            assert not _patch_removed()
            captured = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(plain, captured)  # the capture changes nothing
    assert _patch_removed() and not any(m._forward_hooks or m._forward_pre_hooks for m in sdpa.modules())
    for i, name in enumerate(names):
        weights = capture.maps[name][0]
        assert weights.shape == (3, 4, 10, 10) and weights.dtype == torch.float32
        torch.testing.assert_close(weights, reference.attentions[i], atol=1e-6, rtol=0)
        assert torch.all(weights[1, :, :, 6:] == 0) and torch.all(weights[2, :, :, 3:] == 0)  # padding got nothing
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 10), atol=1e-6, rtol=0)


def test_llama_rotary_grouped_query_causal_and_padding() -> None:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    sdpa, eager = _pair(LlamaModel, config)
    ids, mask = _padded_batch()
    assert list(find_attention_layers(sdpa)) == ["layers.0.self_attn", "layers.1.self_attn"]
    # the head count comes from the config (LlamaAttention has no head attribute): head 4 of 4 is refused up front
    with pytest.raises(ValueError, match=r"heads \[4\] do not exist in layer 'layers.0.self_attn', which has 4 heads"):
        AttentionMapLogger(heads=[0, 4]).setup(None, sdpa, "fit")
    for attention_mask in (None, mask):  # None: SDPA runs with is_causal=True and no mask at all
        with torch.no_grad():
            reference = eager(input_ids=ids, attention_mask=attention_mask, output_attentions=True)
            plain = sdpa(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            with AttentionCapture(sdpa, ["layers.1.*"]) as capture:
                captured = sdpa(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        assert torch.equal(plain, captured)
        assert list(capture.maps) == ["layers.1.self_attn"]
        weights = capture.maps["layers.1.self_attn"][0]
        assert weights.shape == (3, 4, 10, 10)
        torch.testing.assert_close(weights, reference.attentions[1], atol=1e-6, rtol=0)
        assert torch.all(weights.triu(diagonal=1) == 0)  # causal
    assert _patch_removed()


def test_eager_model_weights_are_the_layers_own() -> None:
    _, eager = _pair(BertModel, _bert_config())
    ids, mask = _padded_batch()
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        with AttentionCapture(eager, ["*.layer.1.*"]) as capture:
            eager(input_ids=ids, attention_mask=mask)
    assert torch.equal(capture.maps["encoder.layer.1.attention.self"][0], reference.attentions[1])


def test_nested_captures_each_record_and_the_patch_goes_with_the_last() -> None:
    sdpa, _ = _pair(BertModel, _bert_config())
    ids, mask = _padded_batch()
    with torch.no_grad():
        outer = AttentionCapture(sdpa, ["encoder.layer.0.attention.self"]).__enter__()
        inner = AttentionCapture(sdpa).__enter__()
        sdpa(input_ids=ids, attention_mask=mask)
        outer.remove()  # closed out of order: the inner one still records
        assert not _patch_removed()
        sdpa(input_ids=ids, attention_mask=mask)
        inner.remove()
    assert _patch_removed()
    assert len(outer.maps["encoder.layer.0.attention.self"]) == 1
    assert len(inner.maps["encoder.layer.0.attention.self"]) == 2
    torch.testing.assert_close(outer.maps["encoder.layer.0.attention.self"][0],
                               inner.maps["encoder.layer.0.attention.self"][1], atol=0, rtol=0)


def test_mask_conventions_of_the_recomputation() -> None:
    class Module(torch.nn.Module):
        is_causal = False

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # 4 query heads, 2 key heads
    scores = q.double() @ k.repeat_interleave(2, dim=1).double().transpose(-1, -2) * 8 ** -0.5
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    four_d = keep[:, None, None, :]
    expected = scores.masked_fill(~four_d, float("-inf")).softmax(-1).float()
    module = Module()
    for mask in (four_d, keep.long(), torch.zeros(2, 1, 1, 5).masked_fill(~four_d, torch.finfo(torch.float32).min)):
        torch.testing.assert_close(hf_attention_weights(module, q, k, mask, {}), expected, atol=1e-6, rtol=0)
    # no mask + causal + sliding window 2: each query sees itself and the one before
    windowed = hf_attention_weights(module, q, k, None, {"is_causal": True, "sliding_window": 2})
    allowed = torch.ones(5, 5, dtype=torch.bool).tril().triu(diagonal=-1)
    assert torch.all(windowed[..., ~allowed] == 0) and torch.all(windowed[..., allowed] > 0)
    capped = hf_attention_weights(module, q, k, None, {"softcap": 0.5, "scaling": 1.0})
    raw = q.double() @ k.repeat_interleave(2, dim=1).double().transpose(-1, -2)
    torch.testing.assert_close(capped, (torch.tanh(raw / 0.5) * 0.5).softmax(-1).float(), atol=1e-6, rtol=0)


def test_layer_names_and_errors() -> None:
    model = BertForSequenceClassification._from_config(_bert_config(num_labels=2), attn_implementation="sdpa")
    chosen = resolve_attention_layers(model, ["*.attention.self"])
    assert list(chosen) == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention' is not an attention layer.*"
                                         r"bert.encoder.layer.0.attention.self"):
        resolve_attention_layers(model, ["bert.encoder.layer.0.attention"])


# ----------------------------------------------------------------------------------------------- Trainer
def _fit(root: Path, callbacks: list, **model_kw) -> tuple[TinyBert, TokenPresenceDataModule]:
    L.seed_everything(0)
    model = TinyBert(**model_kw)
    model.model.bert.embeddings.requires_grad_(False)  # a frozen part, whose flags must survive
    dm = TokenPresenceDataModule(n_samples=256)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(root), callbacks=callbacks, deterministic=True, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return model, dm


def test_attention_logger_on_a_transformers_model(tmp_path: Path) -> None:
    logger = AttentionMapLogger(layers=["*.attention.self"], heads=[0, 3], every_n_val_epochs=1, num_samples=2)
    with_logger, dm = _fit(tmp_path / "a", [logger])
    plain, _ = _fit(tmp_path / "b", [])
    for key, value in plain.state_dict().items():  # training is untouched by the capture
        assert torch.equal(value, with_logger.state_dict()[key]), key
    assert describe_modes(plain) == describe_modes(with_logger)
    assert not with_logger.model.bert.embeddings.word_embeddings.weight.requires_grad
    assert _patch_removed()
    # reference: transformers' eager attention with output_attentions=True on the trained weights, first test batch
    eager = TinyBert(attn_implementation="eager").eval()
    eager.load_state_dict(with_logger.state_dict())
    ids = dm.test_dataset.inputs[:2]
    with torch.no_grad():
        reference = eager.model(input_ids=ids, attention_mask=(ids != 0).long(), output_attentions=True).attentions
    folder = tmp_path / "a" / "artifacts" / "attention"
    padded = (ids == 0).numpy()
    assert padded.any()
    for i in range(2):
        (array,) = folder.glob(f"test_model.bert.encoder.layer.{i}.attention.self_step*.npy")
        logged = np.load(array)
        assert logged.shape == (2, 4, 12, 12)
        np.testing.assert_allclose(logged, reference[i].numpy(), atol=1e-6, rtol=0)
        for sample in range(2):  # padded keys get no attention
            assert np.all(logged[sample][..., padded[sample]] == 0)
    stems = [p.name.split("_step")[0] for p in folder.iterdir()]
    assert stems.count("val_sample0") == 2 and stems.count("test_sample1") == 1  # every validation epoch, and test


def test_the_logged_attention_finds_the_deciding_token(tmp_path: Path) -> None:
    """Meaning: the label is "token 7 occurs"; once trained, some layer's first position attends to that token far
    more than uniformly (the logged maps, not a separate computation)."""
    L.seed_everything(0)
    model, dm = TinyBert(), TokenPresenceDataModule()
    logger = AttentionMapLogger(every_n_val_epochs=0, num_samples=64, style="image")  # 64 maps: cheap tiles
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[logger], max_epochs=5)
    trainer.fit(model, datamodule=dm)
    accuracy = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    assert accuracy > 0.95
    ids = dm.test_dataset.inputs[: next(iter(logger.last_maps.values())).shape[0]]
    has_target = (ids == 7).any(1)
    on_target = {}
    for name, maps in logger.last_maps.items():
        first_query = maps[:, :, 0, :].mean(1)  # [B, N], averaged over heads
        on_target[name] = first_query[has_target][(ids == 7)[has_target]].mean().item()
    uniform = (1.0 / (ids[has_target] != 0).sum(1).float()).mean().item()
    assert max(on_target.values()) > max(0.5, 3 * uniform), (on_target, uniform)


def test_attention_logger_on_tinybert_from_yaml(tmp_path: Path) -> None:
    cli = build_from_yaml(ROOT / "configs" / "bert_attention.yaml",
                          extra_args=[f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
                                      "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    (logger,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AttentionMapLogger)]
    assert logger.layers == ["*.attention.self"] and logger.style == "figure"
    assert isinstance(cli.model, TinyBert) and cli.model.model.config._attn_implementation == "sdpa"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert set(logger.last_maps) == {f"model.bert.encoder.layer.{i}.attention.self" for i in range(2)}
    assert list((tmp_path / "artifacts" / "attention").glob("test_sample1_step*.png"))


def test_demo_pieces_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="attn_implementation"):
        TinyBert(attn_implementation="flash")
    with pytest.raises(ValueError, match="hidden_size=30 must be divisible by heads=4"):
        TinyBert(hidden_size=30)
    with pytest.raises(ValueError, match="target_token"):
        TokenPresenceDataModule(vocab_size=5, target_token=7)
    with pytest.raises(ValueError, match="min_length"):
        TokenPresenceDataModule(max_length=4, min_length=6)
    dm = TokenPresenceDataModule(n_samples=400, seed=1)
    dm.setup()
    x, y = dm.train_dataset.inputs, dm.train_dataset.targets
    assert torch.equal(y, (x == 7).any(1).long())  # the label is exactly "token 7 occurs"
    assert 0.35 < y.float().mean() < 0.65 and (x == 0).any() and (x[:, :4] != 0).all()


def test_a_failing_evaluation_leaves_nothing_installed(tmp_path: Path) -> None:
    class Failing(TinyBert):
        def validation_step(self, batch, batch_idx):
            self(batch[0])  # the capture recorded this forward...
            raise RuntimeError("boom")  # ...and then the user's step fails

    model = Failing()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[AttentionMapLogger()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.validate(model, datamodule=TokenPresenceDataModule(n_samples=64), verbose=False)
    assert _patch_removed()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
