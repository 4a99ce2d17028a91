"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021): peft's on transformers models (TinyBert,
a tiny Llama), the plain soft prompt on a token-sequence module (TinyTransformer); only the prompt trains and it
changes the output; modules without token sequences refused at setup."""

from __future__ import annotations

import io
from typing import Any

import lightning as L
import pytest
import torch

from lightning_techniques.demo import DigitsCNN, DigitsDataModule, TinyBert, TinyTransformer, TokenPresenceDataModule
from lightning_techniques.finetune.prompt import (
    PROMPT_NAME,
    PrefixTuning,
    PromptTuning,
    SoftPrompt,
    add_soft_prompt,
    remove_soft_prompt,
    sequence_dim,
)


def _trainer(steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_soft_prompt_prepends_then_replaces_and_is_removable() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(d_model=16, heads=2)
    x = torch.rand(3, 1, 8, 8)
    before = model(x)
    seen: dict[str, tuple[int, ...]] = {}
    probe = model.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("block1", tuple(out.shape)))
    assert add_soft_prompt(model, ["blocks.0", "blocks.1"], num_tokens=3) == ["blocks.0", "blocks.1"]
    after = model(x)
    assert seen["block1"] == (3, 8 + 3, 16), "3 virtual tokens in front of the 8 image-row tokens"
    assert not torch.allclose(after, before)
    probe.remove()
    prompt0, prompt1 = model.blocks[0].soft_prompt, model.blocks[1].soft_prompt
    assert isinstance(prompt0, SoftPrompt) and isinstance(prompt1, SoftPrompt)
    h = torch.randn(2, 5, 16)
    assert torch.equal(prompt0(h)[:, :3], prompt0.tokens.expand(2, -1, -1)) and torch.equal(prompt0(h)[:, 3:], h)
    assert torch.equal(prompt1(h)[:, :3], prompt1.tokens.expand(2, -1, -1)) and torch.equal(prompt1(h)[:, 3:], h[:, 3:])
    torch.save(model, io.BytesIO())
    assert remove_soft_prompt(model) == ["blocks.0", "blocks.1"]
    assert torch.equal(model(x), before)
    assert sequence_dim(TinyTransformer(d_model=16, heads=2).blocks[0]) == 16


def test_plain_prompt_only_the_prompt_trains_and_changes_the_output() -> None:
    L.seed_everything(0, verbose=False)
    module = TinyTransformer(d_model=16, heads=2)
    base = _snapshot(module)
    callback = PromptTuning(num_tokens=4, at="blocks.0", init_std=0.5)
    trainer = _trainer(4, [callback])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert callback.changed_paths == ("blocks.0",) and callback.path == "plain"
    after = module.state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), f"{key} is frozen but changed"
    tokens = after[f"blocks.0.{PROMPT_NAME}.tokens"]
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert [id(p) for p in optimized] == [id(module.blocks[0].soft_prompt.tokens)], "only the prompt is optimized"
    x = torch.rand(2, 1, 8, 8)
    out = module(x)
    with torch.no_grad():
        module.blocks[0].soft_prompt.tokens.add_(torch.randn(4, 16))  # (a constant shift: LayerNorm drops it)
    assert not torch.allclose(module(x), out), "the output depends on the prompt"
    assert tokens.shape == (4, 16)
    assert all(p.requires_grad for p in module.parameters()), "requires_grad back after fit"


def test_prefix_tuning_plain_trains_every_layers_prefix() -> None:
    L.seed_everything(0, verbose=False)
    module = TinyTransformer(d_model=16, heads=2)
    start = {k: v.clone() for k, v in _snapshot(module).items()}
    callback = PrefixTuning(num_tokens=2, at=["blocks.0", "blocks.1"], train_also=["head"])
    first = None
    trainer = _trainer(3, [callback])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    first = module.state_dict()
    assert callback.changed_paths == ("blocks.0", "blocks.1")
    assert not torch.equal(first["head.weight"], start["head.weight"]), "train_also trains"
    assert torch.equal(first["blocks.0.attn.q_proj.weight"], start["blocks.0.attn.q_proj.weight"])


def test_peft_prompt_tuning_on_tiny_bert() -> None:
    pytest.importorskip("transformers")
    L.seed_everything(0, verbose=False)
    module = TinyBert(max_length=16, hidden_size=16, heads=2)  # 12 tokens + 4 virtual ones
    embeddings = module.model.bert.embeddings.word_embeddings.weight.detach().clone()
    callback = PromptTuning(num_tokens=4)
    trainer = _trainer(3, [callback])
    trainer.fit(module, datamodule=TokenPresenceDataModule(n_samples=128, batch_size=16))
    from peft import PeftModel

    assert isinstance(module.model, PeftModel) and callback.changed_paths == ("model",) and callback.path == "peft"
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n for n in trained)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in module.named_parameters()
                         if "prompt_encoder" in n or "modules_to_save" in n}
    assert torch.equal(module.model.base_model.bert.embeddings.word_embeddings.weight, embeddings)
    ids = torch.randint(1, 40, (2, 12))
    out = module(ids)
    with torch.no_grad():
        module.model.prompt_encoder["default"].embedding.weight.add_(torch.randn(4, 16))
    assert not torch.allclose(module(ids), out)


class TinyLlamaLM(L.LightningModule):
    """A tiny causal LM (transformers Llama from a config) classifying a token sequence by its last position's
    logits over two reserved label tokens: peft's prefix tuning works on causal LMs."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                          pad_token_id=0)
        self.lm = transformers.LlamaForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, -1, :2]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return torch.nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_peft_prefix_tuning_on_a_causal_lm_and_refused_where_peft_cannot() -> None:
    L.seed_everything(0, verbose=False)
    module = TinyLlamaLM()
    callback = PrefixTuning(num_tokens=3)
    trainer = _trainer(2, [callback])
    trainer.fit(module, datamodule=TokenPresenceDataModule(n_samples=64, batch_size=16))
    assert callback.changed_paths == ("lm",)
    assert {n for n, p in module.named_parameters() if p.requires_grad} >= {"lm.prompt_encoder.default.embedding.weight"}
    bert = TinyBert()
    with pytest.raises(ValueError, match="past_key_values"):  # BERT in transformers >= 5: refused at setup
        _trainer(1, [PrefixTuning(num_tokens=2)]).fit(bert, datamodule=TokenPresenceDataModule(n_samples=64))
    assert type(bert.model).__name__ == "BertForSequenceClassification", "nothing half-applied"


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        PromptTuning(num_tokens=0)
    with pytest.raises(ValueError, match="task_type"):
        PromptTuning(task_type="CLASSIFY")  # type: ignore[arg-type]
    cnn = DigitsCNN(channels=4)
    with pytest.raises(ValueError, match="no transformers model.*at="):
        _trainer(1, [PromptTuning(num_tokens=2)]).fit(cnn, datamodule=DigitsDataModule())
    with pytest.raises(ValueError, match="token sequence"):
        _trainer(1, [PromptTuning(num_tokens=2, at="features.0")]).fit(cnn, datamodule=DigitsDataModule())
    with pytest.raises(ValueError, match=r"nope.*blocks\.0"):
        _trainer(1, [PromptTuning(num_tokens=2, at="nope")]).fit(TinyTransformer(d_model=16, heads=2),
                                                                 datamodule=DigitsDataModule())
    assert not any(PROMPT_NAME in k for k in cnn.state_dict()) and all(p.requires_grad for p in cnn.parameters())
    bert = TinyBert()  # 12 learned positions: 12 tokens + 2 virtual ones do not fit (refused before the first step)
    trainer = _trainer(1, [PromptTuning(num_tokens=2)])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        trainer.fit(bert, datamodule=TokenPresenceDataModule(n_samples=64))
    assert trainer.global_step == 0 and all(p.requires_grad for p in bert.parameters())
    with pytest.raises(ValueError, match="one layer"):
        _trainer(1, [PromptTuning(num_tokens=2, at=["blocks.0", "blocks.1"])]).fit(  # type: ignore[arg-type]
            TinyTransformer(d_model=16, heads=2), datamodule=DigitsDataModule())
