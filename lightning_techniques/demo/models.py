"""Small, ordinary LightningModules for the demo and the tests.

They are written the way users write theirs (criterion as an attribute, loss returned from ``training_step``,
metrics logged with ``self.log``) and are never modified by the techniques.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_positive


class ClassifierModule(L.LightningModule):
    """Base: cross-entropy classification with ``train_loss`` (per step), ``train_acc`` (epoch mean),
    ``val_loss``/``val_acc`` and ``test_loss``/``test_acc`` logged.

    Args:
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 weight decay.
    """

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", weight_decay: float = 0.0) -> None:
        super().__init__()
        check_positive("lr", lr)
        check_choice("optimizer", optimizer, ["adam", "sgd"])
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.criterion = nn.CrossEntropyLoss()

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", sync_dist=stage != "train")
        hard = y if y.ndim == 1 else y.argmax(dim=1)
        acc = (logits.argmax(dim=1) == hard).float().mean()
        if stage == "train":  # an epoch mean (a per-step accuracy of one batch says little)
            self.log("train_acc", acc, on_step=False, on_epoch=True)
        else:
            self.log(f"{stage}_acc", acc, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DigitsCNN(ClassifierModule):
    """A small CNN for 8x8 digits: two 3x3 conv blocks, global pooling, (optional dropout,) a linear head.

    ``dropout`` > 0 puts an ``nn.Dropout`` before the head (a random layer: exact resume then needs
    :class:`~lightning_techniques.RNGStateCheckpoint`). ``batch_norm=True`` puts an ``nn.BatchNorm2d`` after each
    conv, before its ReLU (``features.1.0``, ``features.3.0``, ``features.6.0``), for the batch-normalisation
    techniques."""

    def __init__(self, channels: int = 32, num_classes: int = 10, lr: float = 3e-3, dropout: float = 0.0,
                 batch_norm: bool = False, **kwargs: Any) -> None:
        super().__init__(lr=lr, **kwargs)
        self.save_hyperparameters()
        check_positive("channels", channels, integer=True)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1).")

        def act(width: int) -> nn.Module:  # BN + ReLU in one slot: the convs keep their paths (features.0/2/5)
            return nn.Sequential(nn.BatchNorm2d(width), nn.ReLU()) if batch_norm else nn.ReLU()

        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            act(channels),
            nn.Conv2d(channels, channels, 3, padding=1),
            act(channels),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            act(2 * channels),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))


class DeepMLP(ClassifierModule):
    """A plain deep MLP (no normalisation, no residuals): with ``depth`` ~20 the initialisation decides whether it
    trains at all, which is what LSUV and other initialisations are for."""

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        depth: int = 20,
        width: int = 64,
        activation: str = "relu",
        lr: float = 0.01,
        optimizer: str = "sgd",
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, **kwargs)
        self.save_hyperparameters()
        check_positive("depth", depth, integer=True)
        check_positive("width", width, integer=True)
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[check_choice("activation", activation, ["relu", "tanh", "gelu"])]
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(previous, width), act()]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention`` (which returns no attention weights)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model={dim} must be divisible by heads={heads}.")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape_as(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(ClassifierModule):
    """A tiny transformer classifier for digits: the 8 image rows are 8 tokens of 8 pixels, plus a learned
    position embedding; pre-norm blocks on SDPA attention; mean-pooled tokens -> linear head."""

    def __init__(
        self,
        tokens: int = 8,
        token_dim: int = 8,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 2,
        num_classes: int = 10,
        lr: float = 3e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        self.save_hyperparameters()
        self.tokens = tokens
        self.token_dim = token_dim
        self.embed = nn.Linear(token_dim, d_model)
        self.pos = nn.Parameter(torch.randn(1, tokens, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList([TransformerBlock(d_model, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.token_dim)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class TabularMLP(ClassifierModule):
    """An MLP for tabular data (default: breast-cancer's 30 features, 2 classes)."""

    def __init__(
        self, in_features: int = 30, num_classes: int = 2, hidden: int = 64, lr: float = 1e-3, **kwargs: Any
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyBert(ClassifierModule):
    """A tiny Hugging Face BERT sequence classifier built from a config (random init, no download), for token batches
    ``(ids [B, N] int64, y [B])`` with ``pad_id`` as padding (e.g. :class:`TokenPresenceDataModule`); the padding mask
    is ``ids != pad_id``. Devlin et al., "BERT", NAACL 2019. Needs the ``hf`` extra (``transformers>=5``).

    Its attention layers are ``model.bert.encoder.layer.<i>.attention.self`` (``attn_implementation``: ``"sdpa"``,
    the default, or ``"eager"``).
    """

    def __init__(
        self,
        vocab_size: int = 40,
        max_length: int = 12,
        hidden_size: int = 32,
        heads: int = 4,
        layers: int = 2,
        num_classes: int = 2,
        pad_id: int = 0,
        attn_implementation: str = "sdpa",
        lr: float = 2e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        check_choice("attn_implementation", attn_implementation, ["sdpa", "eager"])
        if hidden_size % heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by heads={heads}.")
        self.save_hyperparameters()
        transformers = require("transformers", "hf", "TinyBert")
        config = transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * hidden_size, max_position_embeddings=max_length, num_labels=num_classes,
            pad_token_id=pad_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation=attn_implementation,
        )
        self.pad_id = pad_id
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits
