"""Attention weights of Hugging Face ``transformers`` attention layers, also under SDPA / flash kernels.

Since transformers 5, every attention module of a ``transformers`` model (``BertSelfAttention``, ``LlamaAttention``,
``GPT2Attention``, ``ViTSelfAttention``, ...) computes its projections, applies its position embedding (rotary, ...)
and then hands ``query [B, H, Nq, D]``, ``key [B, Hkv, Nk, D]``, the mask and ``scaling`` to one function looked up
in transformers' ``AttentionInterface`` (``sdpa``, ``flash_attention_2``, ``flex_attention``...) or, for ``eager``,
to the model file's ``eager_attention_forward``, which returns the weights itself.

So the capture works at that one place:

* eager: the attention module returns ``(output, weights)``; a forward hook on it keeps ``weights``;
* any other implementation: while a capture is active, ``AttentionInterface.__getitem__`` hands out the same function
  wrapped so that, after it ran, the weights are recomputed from the very ``query`` / ``key`` / mask it received
  (rotary embedding, grouped-query heads, causal / padding / sliding-window masks and softcapping included) with the
  ``eager`` formula, in float32 at least. The function's own result is returned untouched, so outputs are bit-identical.

The class-level wrapper is installed while at least one :class:`AttentionCapture` with such layers is open and
removed when the last one closes; modules that were not asked for pass straight through.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

_FORWARD_MENTIONS: dict[type, bool] = {}


def _transformers_5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def is_hf_attention_layer(module: nn.Module) -> bool:
    """True for a ``transformers`` (>= 5) module whose ``forward`` dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return False
    if cls not in _FORWARD_MENTIONS and not _transformers_5():
        _FORWARD_MENTIONS[cls] = False  # 4.x attention classes compute in their own ways: not handled
    if cls not in _FORWARD_MENTIONS:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _FORWARD_MENTIONS[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _FORWARD_MENTIONS[cls]


@torch.no_grad()
def hf_attention_weights(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                         kwargs: dict[str, Any]) -> Tensor:
    """``[B, H, Nq, Nk]`` weights that ``eager`` attention would compute from what an attention function received.

    Mirrors transformers' ``sdpa_attention_forward`` conventions: grouped-query keys are repeated per query head; with
    no mask, ``is_causal`` (keyword, else ``module.is_causal``, default True) and ``Nq > 1`` mean an upper-left causal
    mask; a boolean mask keeps ``True``; a float mask is added; a 2-D ``[B, Nk]`` mask is a key padding mask (flash
    kernels); ``position_bias`` is added, ``softcap`` applied and ``sliding_window`` respected.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)  # half-precision models: softmax in float32
    q = query.detach().to(dtype)
    k = key.detach().to(dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        if heads % kv_heads:
            raise ValueError(f"{type(module).__name__}: {heads} query heads are not a multiple of {kv_heads} key heads.")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * float(scaling)
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    bias = kwargs.get("position_bias")
    if bias is not None:
        scores = scores + bias.detach().to(dtype)
    nq, nk = scores.shape[-2:]
    if attention_mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if causal and nq > 1:
            rows = torch.arange(nq, device=scores.device)[:, None]
            cols = torch.arange(nk, device=scores.device)[None, :]
            allowed = cols <= rows
            window = kwargs.get("sliding_window")
            if window:
                allowed &= rows - cols < window
            scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        mask = attention_mask.detach()
        if mask.ndim == 2:  # [B, Nk] key padding (flash-attention style): 1 = attend
            mask = mask[:, None, None, :].bool()
        mask = mask[..., :nq, :nk]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(dtype)
    weights = scores.softmax(dim=-1).nan_to_num(0.0)  # a row with every key masked attends to nothing
    return weights.to(query.dtype)


class _InterfacePatch:
    """The one class-level wrapper of ``AttentionInterface.__getitem__``, shared by all open captures."""

    def __init__(self) -> None:
        self.captures: list[Any] = []  # AttentionCapture objects with transformers layers, in opening order
        self._cls: Any = None
        self._had_own: Any = None

    def add(self, capture: Any) -> None:
        if not self.captures:
            self._install()
        self.captures.append(capture)

    def discard(self, capture: Any) -> None:
        if capture in self.captures:
            self.captures.remove(capture)
            if not self.captures:
                self._uninstall()

    def _install(self) -> None:
        from transformers.modeling_utils import AttentionInterface

        original_getitem = AttentionInterface.__getitem__
        self._cls = AttentionInterface
        self._had_own = AttentionInterface.__dict__.get("__getitem__")
        patch = self

        def __getitem__(interface: Any, key: str) -> Any:
            return patch.wrap(original_getitem(interface, key))

        setattr(AttentionInterface, "__getitem__", __getitem__)  # noqa: B010 (a method assignment mypy refuses)

    def _uninstall(self) -> None:
        if self._had_own is None:
            del self._cls.__getitem__
        else:
            self._cls.__getitem__ = self._had_own
        self._cls = None

    def wrap(self, function: Any) -> Any:
        if getattr(function, "_lt_attention_capture", False):
            return function

        def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      *args: Any, **kwargs: Any) -> Any:
            result = function(module, query, key, value, attention_mask, *args, **kwargs)
            for capture in self.captures:
                name = capture._hf_names.get(id(module))
                if name is not None:
                    weights = result[1] if isinstance(result, tuple) and len(result) > 1 else None
                    if not (isinstance(weights, Tensor) and weights.ndim == 4):
                        weights = hf_attention_weights(module, query, key, attention_mask, kwargs)
                    capture._hf_pending[name] = weights.detach()
            return result

        attention._lt_attention_capture = True  # type: ignore[attr-defined]
        return attention


INTERFACE_PATCH = _InterfacePatch()
