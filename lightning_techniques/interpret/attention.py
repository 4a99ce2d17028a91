"""Attention maps of chosen layers and heads, captured without changing the model's outputs, also when the model
uses ``F.scaled_dot_product_attention`` (which returns no weights).

The attention weights are those of Vaswani et al., "Attention Is All You Need", NeurIPS 2017:
``softmax(q k^T / sqrt(d_head))`` per head. Visualising them per layer and head follows e.g. Vig, "A Multiscale
Visualization of Attention in the Transformer Model", ACL 2019 (demo track).

Three kinds of attention layer are recognised:

* attention layers of Hugging Face ``transformers`` models (5.x: those whose ``forward`` dispatches through
  ``ALL_ATTENTION_FUNCTIONS``, e.g. ``BertSelfAttention``, ``LlamaAttention``): the weights ``eager`` returns, or, under
  SDPA / flash / flex kernels, weights recomputed from the exact ``query`` / ``key`` / mask handed to the kernel
  (after rotary embeddings, with grouped-query heads and padding masks) - see ``_hf_attention``;
* modules with ``q_proj`` / ``k_proj`` linear projections and a head count (``heads``, ``num_heads``, ``n_heads``
  or ``num_attention_heads``), like the demo's ``SelfAttention`` on SDPA: forward hooks keep the outputs of
  ``q_proj`` and ``k_proj`` and the weights are recomputed from them by hand;
* ``nn.MultiheadAttention``: a forward hook repeats the call in a side computation with ``need_weights=True,
  average_attn_weights=False`` (same inputs and masks) and keeps only the weights (for the layers of an
  ``nn.TransformerEncoder`` the hook sits on the encoder, see :class:`AttentionCapture`).

Hooks only observe (they return nothing), so the model's outputs are bit-identical with and without the capture.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_techniques._internal.artifacts import ArtifactLogger
from lightning_techniques._internal.batch import get_inputs
from lightning_techniques._internal.eval_stages import EvaluationCallback
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_number, check_positive
from lightning_techniques.interpret._hf_attention import INTERFACE_PATCH, is_hf_attention_layer

_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads")


def _head_count(module: nn.Module) -> int | None:
    for attr in _HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _layer_heads(module: nn.Module) -> int | None:
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads
    count = _head_count(module)
    if count is None and is_hf_attention_layer(module):  # e.g. LlamaAttention keeps the count in its config only
        count = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return count


def is_attention_layer(module: nn.Module) -> bool:
    """True for ``nn.MultiheadAttention``, ``transformers`` attention layers and q/k-projection modules (see the
    module docstring)."""
    if isinstance(module, nn.MultiheadAttention) or is_hf_attention_layer(module):
        return True
    return (
        isinstance(getattr(module, "q_proj", None), nn.Module)
        and isinstance(getattr(module, "k_proj", None), nn.Module)
        and _head_count(module) is not None
    )


def find_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of every attention layer of ``model`` (in ``named_modules`` order)."""
    return {name: m for name, m in model.named_modules() if name and is_attention_layer(m)}


def attention_from_qk(q: Tensor, k: Tensor, heads: int, scale: float | None = None, causal: bool = False) -> Tensor:
    """``softmax(q k^T * scale)`` per head from projected ``q [B, Nq, D]`` and ``k [B, Nk, D]`` -> ``[B, H, Nq, Nk]``.

    ``scale`` defaults to ``1 / sqrt(D / heads)`` (what ``F.scaled_dot_product_attention`` uses); ``causal`` masks
    key positions after the query position (as SDPA's ``is_causal=True``).
    """
    b, nq, d = q.shape
    nk = k.shape[1]
    if d % heads:
        raise ValueError(f"projection width {d} is not divisible by heads={heads}.")
    dh = d // heads
    qh = q.reshape(b, nq, heads, dh).transpose(1, 2).double()
    kh = k.reshape(b, nk, heads, dh).transpose(1, 2).double()
    scores = qh @ kh.transpose(-1, -2) * (scale if scale is not None else 1.0 / math.sqrt(dh))
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(q.dtype)


class AttentionCapture:
    """Context manager that records the attention weights of ``layers`` during every forward pass inside it.

    ``capture.maps[name]`` is a list with one ``[B, H, Nq, Nk]`` tensor (detached) per call of that layer.

    Args:
        model: the model.
        layers: qualified names or glob patterns of attention layers (default: every attention layer).
        causal: the q/k-projection layers use a causal mask (``is_causal=True``).
        scale: softmax temperature of the q/k-projection layers (default ``1/sqrt(d_head)``).

    Example::

        with AttentionCapture(model, ["blocks.0.attn"]) as cap:
            logits = model(x)
        weights = cap.maps["blocks.0.attn"][0]     # [B, heads, N, N], rows sum to 1

    ``nn.TransformerEncoderLayer``: any hook on the layer or inside it makes PyTorch leave its fused inference path,
    whose results differ from the unfused one in the last bits. So for the layers of an ``nn.TransformerEncoder``
    the hook sits on the encoder, which after its forward replays its layers (same calls: the fused path again) on
    the same input and asks each wanted ``self_attn`` for its weights - bit-identical outputs, at the cost of a
    second encoder pass on the captured batch. A lone ``TransformerEncoderLayer`` is hooked directly (its outputs
    may then differ from the fused path by ~1e-6).

    Limits: q/k-projection layers are assumed to compute plain ``softmax(q k^T * scale)`` of their projections (no
    rotary position embedding, no attention mask other than ``causal``); an ``nn.TransformerEncoder`` that turns a
    padded batch into nested tensors (fast path with ``src_key_padding_mask``) is not recorded (a warning says so);
    ``nn.TransformerDecoderLayer``'s attention is recorded only when it runs its modules (it has no fused path).
    ``causal`` and ``scale`` are for q/k-projection layers only: ``transformers`` layers bring their own mask and
    scaling. For those, attention sinks (gpt-oss) and ALiBi-style biases applied inside a kernel are not included.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, causal: bool = False,
                 scale: float | None = None) -> None:
        self.model = model
        self.layers = resolve_attention_layers(model, layers)
        self.causal = causal
        self.scale = scale
        self.maps: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        self._handles: list[Any] = []
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._in_side_call = False
        self._hf_names: dict[int, str] = {}  # id(transformers attention module) -> name, read by INTERFACE_PATCH
        self._hf_pending: dict[str, Tensor] = {}

    def __enter__(self) -> AttentionCapture:
        modules = dict(self.model.named_modules())
        encoders: dict[str, dict[int, str]] = {}
        for name, module in self.layers.items():
            parts = name.split(".")
            parent = modules.get(".".join(parts[:-1])) if len(parts) > 1 else None
            encoder = modules.get(".".join(parts[:-3])) if len(parts) > 3 else (self.model if len(parts) == 3 else None)
            if is_hf_attention_layer(module):
                self._hf_names[id(module)] = name
                self._handles.append(module.register_forward_pre_hook(self._hf_clear(name)))
                self._handles.append(module.register_forward_hook(self._hf_combine(name)))
            elif (isinstance(parent, nn.TransformerEncoderLayer) and parent.self_attn is module
                    and isinstance(encoder, nn.TransformerEncoder) and parts[-3] == "layers"):
                # a hook on (or inside) a TransformerEncoderLayer turns off PyTorch's fused inference path, whose
                # results differ from the unfused path in the last bits: hook the encoder instead and replay
                encoders.setdefault(".".join(parts[:-3]), {})[int(parts[-2])] = name
            elif isinstance(parent, nn.TransformerEncoderLayer) and parent.self_attn is module:
                self._handles.append(parent.register_forward_hook(self._encoder_layer_hook(name), with_kwargs=True))
            elif isinstance(module, nn.MultiheadAttention):
                self._handles.append(module.register_forward_hook(self._mha_hook(name), with_kwargs=True))
            else:
                self._pending[name] = {}
                q_proj, k_proj = cast(nn.Module, module.q_proj), cast(nn.Module, module.k_proj)
                self._handles.append(q_proj.register_forward_hook(self._keep(name, "q")))
                self._handles.append(k_proj.register_forward_hook(self._keep(name, "k")))
                self._handles.append(module.register_forward_hook(self._combine(name, module)))
        for encoder_name, wanted in encoders.items():
            encoder = modules[encoder_name]
            self._handles.append(encoder.register_forward_hook(self._encoder_hook(wanted), with_kwargs=True))
        if self._hf_names:
            INTERFACE_PATCH.add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        INTERFACE_PATCH.discard(self)

    def _keep(self, name: str, which: str) -> Any:
        def hook(_m: nn.Module, _i: Any, output: Tensor) -> None:
            self._pending[name][which] = output.detach()
        return hook

    def _combine(self, name: str, module: nn.Module) -> Any:
        heads = _head_count(module)
        assert heads is not None

        def hook(_m: nn.Module, _i: Any, _o: Any) -> None:
            pending = self._pending[name]
            if "q" in pending and "k" in pending:
                with torch.no_grad():
                    self.maps[name].append(attention_from_qk(pending["q"], pending["k"], heads, self.scale, self.causal))
            self._pending[name] = {}
        return hook

    def _hf_clear(self, name: str) -> Any:
        def hook(_m: nn.Module, _i: Any) -> None:
            self._hf_pending.pop(name, None)
        return hook

    def _hf_combine(self, name: str) -> Any:
        def hook(module: nn.Module, _i: Any, output: Any) -> None:
            weights = self._hf_pending.pop(name, None)  # set by the wrapped kernel (sdpa, flash, flex, ...)
            if weights is None and isinstance(output, tuple) and len(output) > 1:
                candidate = output[1]  # eager returns (output, weights)
                if isinstance(candidate, Tensor) and candidate.ndim == 4:
                    weights = candidate.detach()
            if weights is None:
                warnings.warn(f"{name} ({type(module).__name__}) ran, but its attention weights could not be "
                              "recovered (the kernel was not looked up through transformers' AttentionInterface).",
                              stacklevel=2)
                return
            self.maps[name].append(weights)
        return hook

    def _mha_hook(self, name: str) -> Any:
        def hook(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
            if self._in_side_call:
                return
            call_kwargs = dict(kwargs)
            positional = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                          "average_attn_weights", "is_causal")
            call_kwargs.update({positional[i]: a for i, a in enumerate(args) if i >= 3})
            call_kwargs["need_weights"] = True
            call_kwargs["average_attn_weights"] = False
            self._in_side_call = True
            try:
                with torch.no_grad():  # the side call's output is discarded: only the weights are kept
                    _, weights = module.forward(*args[:3], **call_kwargs)
            finally:
                self._in_side_call = False
            assert weights is not None  # need_weights=True
            if weights.ndim == 3:  # unbatched input: [H, L, S]
                weights = weights.unsqueeze(0)
            self.maps[name].append(weights.detach())
        return hook


    def _encoder_hook(self, wanted: dict[int, str]) -> Any:
        def hook(encoder: nn.TransformerEncoder, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
            call = dict(zip(("src", "mask", "src_key_padding_mask", "is_causal"), args))
            call.update(kwargs)
            h, mask, padding = call["src"], call.get("mask"), call.get("src_key_padding_mask")
            causal = bool(call.get("is_causal") or False)
            with torch.no_grad():  # replay the layers (same calls, same kernels) to get each layer's input
                for index, layer in enumerate(encoder.layers):
                    if index > max(wanted):
                        break
                    if index in wanted:
                        self.maps[wanted[index]].append(_self_attention_weights(layer, h, mask, padding, causal))
                    h = layer(h, src_mask=mask, src_key_padding_mask=padding, is_causal=causal)
        return hook

    def _encoder_layer_hook(self, name: str) -> Any:
        def hook(layer: nn.TransformerEncoderLayer, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
            call = dict(zip(("src", "src_mask", "src_key_padding_mask", "is_causal"), args))
            call.update(kwargs)
            src = call["src"]
            if getattr(src, "is_nested", False):
                warnings.warn(f"{name}: the encoder passed a nested tensor (padding-mask fast path); its attention "
                              "is not recorded.", stacklevel=2)
                return
            self.maps[name].append(_self_attention_weights(layer, src, call.get("src_mask"),
                                                           call.get("src_key_padding_mask"),
                                                           bool(call.get("is_causal") or False)))
        return hook


@torch.no_grad()
def _self_attention_weights(layer: nn.TransformerEncoderLayer, src: Tensor, mask: Tensor | None,
                            padding: Tensor | None, causal: bool) -> Tensor:
    """``[B, H, N, N]`` weights of ``layer.self_attn`` on the layer's self-attention input (as in ``_sa_block``)."""
    x = layer.norm1.forward(src) if layer.norm_first else src
    _, weights = layer.self_attn.forward(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=True,
                                         average_attn_weights=False, is_causal=causal and mask is not None)
    assert weights is not None  # need_weights=True
    return (weights.unsqueeze(0) if weights.ndim == 3 else weights).detach()


def resolve_attention_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """The attention layers named by ``layers`` (names or glob patterns; default all); raises ``ValueError``
    naming what was not found and listing the attention layers that exist."""
    found = find_attention_layers(model)
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"{type(model).__name__} has no attention layer (nn.MultiheadAttention, a transformers>=5 attention layer, "
            f"or a module with q_proj/k_proj and a head count attribute {list(_HEAD_ATTRS)}). Module types in it: "
            f"{kinds}."
        )
    if not layers:
        return found
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for pattern in layers:
        matches = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            what = "is not an attention layer" if pattern in modules else "matches no layer"
            raise ValueError(f"layer {pattern!r} {what} of {type(model).__name__}; its attention layers are {list(found)}.")
        for n in matches:
            chosen[n] = found[n]
    return chosen


@torch.no_grad()
def attention_maps(model: nn.Module, inputs: Any, layers: Sequence[str] | None = None, causal: bool = False,
                   scale: float | None = None) -> dict[str, Tensor]:
    """Run ``model(inputs)`` once and return ``{layer: [B, H, Nq, Nk]}`` (first call of each layer)."""
    with AttentionCapture(model, layers, causal, scale) as capture:
        model(inputs)
    missing = [n for n, maps in capture.maps.items() if not maps]
    if missing:
        warnings.warn(f"attention layers {missing} were not called (or bypassed by a fused fast path).", stacklevel=2)
    return {n: maps[0] for n, maps in capture.maps.items() if maps}


def _short_layer_names(names: list[str]) -> tuple[list[str], str]:
    """Row labels without the dotted prefix all ``names`` share (``model.bert.encoder.layer``), and that prefix."""
    parts = [n.split(".") for n in names]
    common = 0
    if len(names) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    return [".".join(p[common:]) for p in parts], ".".join(parts[0][:common])


def plot_attention(maps: dict[str, Tensor], sample: int = 0, heads: Sequence[int] | None = None,
                   token_labels: Sequence[str] | None = None, title: str = "") -> Any:
    """A matplotlib Figure: one heat map per (layer, head) of ``maps`` (``{layer: [B, H, Nq, Nk]}``) for ``sample``,
    rows = layers, columns = heads; the y axis is the query position, the x axis the key position (labelled with
    ``token_labels`` when given, else position indices), all maps on one colour scale with one colorbar
    (attention weight)."""
    figure_mod = require("matplotlib.figure", "interpret", "attention figures")
    names = list(maps)
    labels, prefix = _short_layer_names(names)
    if prefix:
        title = f"{title}\n{prefix}.*" if title else f"{prefix}.*"
    n_heads = max(m.shape[1] for m in maps.values())
    cols = list(heads) if heads is not None else list(range(n_heads))
    shown = [maps[name][sample, head].float().cpu() for name in names for head in cols if head < maps[name].shape[1]]
    vmax = max(float(m.max()) for m in shown) if shown else 1.0
    fig = figure_mod.Figure(figsize=(1.9 * len(cols) + 1.6, 1.9 * len(names) + 0.8 + 0.15 * title.count("\n")),
                            layout="constrained")  # room for the (two-line) title and the colorbar
    axes = fig.subplots(len(names), len(cols), squeeze=False)
    image = None
    for r, name in enumerate(names):
        for c, head in enumerate(cols):
            ax = axes[r][c]
            if head < maps[name].shape[1]:
                m = maps[name][sample, head].float().cpu().numpy()
                image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
                n_q, n_k = m.shape
                if token_labels is not None and len(token_labels) >= max(n_q, n_k):
                    if r == len(names) - 1:
                        ax.set_xticks(range(n_k), list(token_labels[:n_k]), fontsize=6, rotation=90)
                    else:
                        ax.set_xticks([])
                    if c == 0:
                        ax.set_yticks(range(n_q), list(token_labels[:n_q]), fontsize=6)
                    else:
                        ax.set_yticks([])
                else:
                    ax.tick_params(labelsize=6)
                    if r != len(names) - 1:
                        ax.set_xticklabels([])
                    if c != 0:
                        ax.set_yticklabels([])
            else:
                ax.set_axis_off()
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{labels[r]}\nquery", fontsize=7)
            if r == len(names) - 1:
                ax.set_xlabel("key", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def attention_grid_image(maps: dict[str, Tensor], sample: int = 0, heads: Sequence[int] | None = None,
                         cell: int = 48, gap: int = 2) -> Any:
    """An ``H x W x 3`` uint8 image: one viridis heat map per (layer, head) of ``maps`` for ``sample`` (rows: layers,
    columns: heads; each map scaled to ``[0, its max]``). Much cheaper than :func:`plot_attention` (no matplotlib
    figure is drawn), which is what keeps :class:`AttentionMapLogger`'s default cost small."""
    import numpy as np

    mpl = require("matplotlib", "interpret", "attention images")
    cmap = mpl.colormaps["viridis"]
    names = list(maps)
    n_heads = max(m.shape[1] for m in maps.values())
    cols = list(heads) if heads is not None else list(range(n_heads))
    tiles = []
    for name in names:
        row = []
        for head in cols:
            if head < maps[name].shape[1]:
                m = maps[name][sample, head].float().cpu()
                m = m / m.max().clamp(min=1e-12)
                scale = max(1, cell // max(m.shape))
                m = m.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
                rgb = (cmap(m.numpy())[..., :3] * 255).astype(np.uint8)
            else:
                rgb = np.zeros((cell, cell, 3), np.uint8)
            row.append(rgb)
        tiles.append(row)
    h = max(t.shape[0] for r in tiles for t in r)
    w = max(t.shape[1] for r in tiles for t in r)
    image = np.full((len(names) * (h + gap) - gap, len(cols) * (w + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            image[i * (h + gap) : i * (h + gap) + t.shape[0], j * (w + gap) : j * (w + gap) + t.shape[1]] = t
    return image


class AttentionMapLogger(EvaluationCallback):
    """Logs attention maps of chosen layers and heads every N validation epochs (and at test end), captured from the
    module's own forward pass on the first evaluation batch - no extra forward, outputs bit-identical.

    Weights are ``softmax(q k^T / sqrt(d_head))`` (Vaswani et al. 2017), recomputed from hooked ``q_proj``/
    ``k_proj`` outputs for SDPA-based layers (SDPA returns no weights), taken from a side call with
    ``need_weights=True`` for ``nn.MultiheadAttention``, and for ``transformers`` layers recomputed from the query,
    key and mask handed to the attention kernel (see :class:`AttentionCapture`).

    Runs on global rank 0 only (other ranks do nothing, so no collective is involved); works under Lightning's
    ``inference_mode`` evaluation (it needs no gradients) and changes no train/eval mode or ``requires_grad`` flag.
    For each of the first ``num_samples`` samples it writes ``attention/<val|test>_sample<i>`` (rows: layers,
    columns: heads): by default (``style="figure"``) a figure a reader can read on its own (:func:`plot_attention`:
    query / key axes labelled with the tokens when ``token_names`` are given, one colorbar of the attention
    weight), or with ``style="image"`` a bare tiled PNG (~10x cheaper to draw, no axes); and, per layer, the
    ``[num_samples, H, N, N]`` array ``attention/<val|test>_<layer>``.
    The last maps are kept in ``self.last_maps``.

    Args:
        layers: qualified names or glob patterns of attention layers (default: all that exist).
        heads: head indices to draw (default: all; arrays always hold every head).
        every_n_val_epochs: log every N-th validation epoch (0: never during fit).
        on_test: also log at test.
        num_samples: samples of the first batch to log.
        style: ``"figure"`` (matplotlib figure with axes and colorbar) or ``"image"`` (tiled heat maps, cheap).
        token_names: the vocabulary (``token_names[id]`` names token ``id``): with integer input ids in the batch
            (``input_ids`` / the first element) the axes are labelled with the sample's tokens.
        causal: the q/k-projection layers use a causal mask.
        scale: softmax temperature of q/k-projection layers (default ``1/sqrt(d_head)``).

    Example::

        trainer = L.Trainer(callbacks=[AttentionMapLogger(layers=["blocks.*.attn"], every_n_val_epochs=5)])
        trainer.fit(TinyTransformer(), datamodule=DigitsDataModule())

    Hugging Face ``transformers`` (>= 5) models work as they are, with any ``attn_implementation``: a BERT wrapped in
    the user's LightningModule gives layers like ``model.bert.encoder.layer.0.attention.self`` (glob
    ``"*.attention.self"``), a Llama ``model.model.layers.0.self_attn``; padding masks, causal masks, rotary
    embeddings and grouped-query heads are those the model itself used.

    Limits: q/k-projection layers must compute plain scaled dot-product attention of their projections (no rotary
    embeddings, no padding mask); see :class:`AttentionCapture` for ``nn.TransformerEncoder`` with padding masks and
    for what is not included for ``transformers`` layers.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        heads: list[int] | None = None,
        every_n_val_epochs: int = 5,
        on_test: bool = True,
        num_samples: int = 1,
        style: Literal["image", "figure"] = "figure",
        causal: bool = False,
        scale: float | None = None,
        token_names: list[str] | None = None,
    ) -> None:
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers must be a list of layer names or glob patterns, got {layers!r}.")
        if heads is not None:
            if isinstance(heads, int) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads):
                raise TypeError(f"heads must be a list of non-negative head indices, got {heads!r}.")
        check_number("every_n_val_epochs", every_n_val_epochs, low=0, integer=True)
        check_positive("num_samples", num_samples, integer=True)
        check_choice("style", style, ["image", "figure"])
        if scale is not None:
            check_positive("scale", scale)
        self.layers = list(layers) if layers else None
        self.heads = list(heads) if heads is not None else None
        self.every_n_val_epochs = every_n_val_epochs
        self.on_test = on_test
        self.num_samples = num_samples
        self.style = style
        if token_names is not None and (isinstance(token_names, str) or not all(isinstance(t, str) for t in token_names)):
            raise TypeError(f"token_names must be a list of strings (the vocabulary) or None, got {token_names!r}.")
        self.token_names = list(token_names) if token_names is not None else None
        self.causal = causal
        self.scale = scale
        super().__init__()  # val_epochs_seen
        self.last_maps: dict[str, Tensor] = {}
        self._capture: AttentionCapture | None = None
        self._active = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        require("matplotlib", "interpret", "AttentionMapLogger")
        chosen = resolve_attention_layers(pl_module, self.layers)
        if self.heads is not None:
            for name, module in chosen.items():
                count = _layer_heads(module)
                bad = [h for h in self.heads if count is not None and h >= count]
                if bad:
                    raise ValueError(f"heads {bad} do not exist in layer {name!r}, which has {count} heads.")

    def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._active = False
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if stage == "test":
            self._active = self.on_test
        elif trainer.state.fn != "fit":
            self._active = True
        else:
            self._active = self.validation_due(trainer)

    def _batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self._active and batch_idx == 0 and dataloader_idx == 0:
            self._capture = AttentionCapture(pl_module, self.layers, self.causal, self.scale).__enter__()

    def _batch_end(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int,
                   stage: str) -> None:
        if self._capture is None:
            return
        capture, self._capture = self._capture, None
        capture.remove()
        self._active = False
        maps = {name: m[0][: self.num_samples].cpu() for name, m in capture.maps.items() if m}
        missing = [name for name, m in capture.maps.items() if not m]
        if missing:
            warnings.warn(
                f"AttentionMapLogger: layers {missing} were not called during the forward pass (or were bypassed by "
                "a fused fast path); nothing was logged for them.", stacklevel=2
            )
        if not maps:
            return
        self.last_maps = maps
        artifacts = ArtifactLogger(trainer)
        name = "val" if stage == "validate" else "test"
        for layer, m in maps.items():
            artifacts.log_array(f"attention/{name}_{layer}", m)
        count = min(m.shape[0] for m in maps.values())
        tokens = self._tokens(batch, count)
        for i in range(count):
            if self.style == "image":
                artifacts.log_image(f"attention/{name}_sample{i}", attention_grid_image(maps, sample=i, heads=self.heads))
            else:
                fig = plot_attention(maps, sample=i, heads=self.heads, token_labels=tokens[i] if tokens else None,
                                     title=f"attention ({name}, step {trainer.global_step}, sample {i})")
                artifacts.log_figure(f"attention/{name}_sample{i}", fig)

    def _tokens(self, batch: Any, count: int) -> list[list[str]] | None:
        """The tokens of the first ``count`` samples, when ``token_names`` and integer input ids are known."""
        if self.token_names is None:
            return None
        try:
            ids = get_inputs(batch)
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        if ids.is_floating_point() or ids.ndim != 2:
            return None
        vocab = self.token_names
        return [[vocab[t] if 0 <= t < len(vocab) else str(t) for t in row] for row in ids[:count].tolist()]

    def _stop(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._active = False

    def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop()  # maps are logged from the first batch (_batch_end); nothing is left to compute


__all__ = [
    "AttentionCapture",
    "AttentionMapLogger",
    "attention_from_qk",
    "attention_grid_image",
    "attention_maps",
    "find_attention_layers",
    "plot_attention",
]
