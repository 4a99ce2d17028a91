"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021): learnable virtual tokens, the model frozen.

Two paths, chosen at setup:

* a Hugging Face ``transformers`` model inside the user's module (e.g. the demo ``TinyBert``'s ``model``): peft's
  ``PromptTuningConfig`` / ``PrefixTuningConfig`` through ``get_peft_model``; the attribute that held the model then
  holds the ``PeftModel`` (the declared change);
* a plain token-sequence module (e.g. the demo ``TinyTransformer``), where peft does not apply: written here. A
  :class:`SoftPrompt` prepends learnable tokens to the input ``[batch, tokens, features]`` of the layer named by
  ``at`` (a forward pre-hook; for an ``nn.Embedding`` the tokens are prepended to its output); for prefix tuning every
  further layer in ``at`` overwrites those positions with its own learnable activations, which is Li & Liang's
  parametrisation (the prefix's activations are free parameters at every layer).

Functional core: :class:`SoftPrompt`, :func:`add_soft_prompt`, :func:`remove_soft_prompt`, :func:`sequence_dim`,
:func:`find_hf_model`, :func:`apply_peft_prompt`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_number, check_positive
from lightning_techniques.finetune._trainable import FinetuneSession, check_targets, resolve_targets
from lightning_techniques.finetune.adapters import other_methods

#: The child module name a soft prompt is registered under on its layer.
PROMPT_NAME = "soft_prompt"

TaskType = Literal["auto", "SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION"]
_TASK_TYPES = ["auto", "SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION"]
_TASK_SUFFIXES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                  ("ForTokenClassification", "TOKEN_CLS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                  ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForQuestionAnswering", "QUESTION_ANS"))


class SoftPrompt(nn.Module):
    """``num_tokens`` learnable vectors of size ``dim`` (normal, std ``init_std``, from ``generator``).

    ``mode="prepend"``: they are put in front of the sequence; ``mode="replace"``: they overwrite its first
    ``num_tokens`` positions (the prefix positions a previous ``prepend`` created)."""

    def __init__(self, num_tokens: int, dim: int, init_std: float = 0.02, mode: str = "prepend",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive("num_tokens", num_tokens, integer=True)
        check_positive("dim", dim, integer=True)
        self.mode = check_choice("mode", mode, ["prepend", "replace"])
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim, generator=generator) * init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(h) or h.ndim != 3 or h.shape[-1] != self.tokens.shape[-1]:
            shape = tuple(h.shape) if torch.is_tensor(h) else type(h).__name__
            raise ValueError(f"SoftPrompt: the layer's input must be a token sequence [batch, tokens, "
                             f"{self.tokens.shape[-1]}], got {shape}.")
        prompt = self.tokens.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        if self.mode == "prepend":
            return torch.cat([prompt, h], dim=1)
        k = self.tokens.shape[0]
        if h.shape[1] < k:
            raise ValueError(f"SoftPrompt: a sequence of {h.shape[1]} tokens has no {k} prefix positions to replace.")
        return torch.cat([prompt, h[:, k:]], dim=1)


def _prompt_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the layer's first input through its soft prompt (module level, so the module pickles)."""
    prompt = module._modules[PROMPT_NAME]
    assert prompt is not None
    return (prompt(args[0]), *args[1:])


def _prompt_output_hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook for an ``nn.Embedding``: the soft prompt in front of the embedded tokens."""
    prompt = module._modules[PROMPT_NAME]
    assert prompt is not None
    return prompt(output)


def _own_dim(layer: nn.Module) -> int | None:
    if isinstance(layer, nn.LayerNorm):
        return int(layer.normalized_shape[-1])
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    if isinstance(layer, nn.MultiheadAttention):
        return int(layer.embed_dim)
    if isinstance(layer, nn.Embedding):
        return int(layer.embedding_dim)
    return None


def sequence_dim(layer: nn.Module, path: str = "layer") -> int:
    """The feature size of the token sequence ``layer`` takes (``[batch, tokens, features]``): from the layer itself
    (LayerNorm, Linear, MultiheadAttention, Embedding) or its first child, recursively (a pre-norm transformer block
    starts with its LayerNorm). Raises ``ValueError`` for layers that take no token sequence (convolutions, ...)."""
    current: nn.Module | None = layer
    while current is not None:
        dim = _own_dim(current)
        if dim is not None:
            return dim
        current = next(iter(current.children()), None)
    raise ValueError(
        f"{path} ({type(layer).__name__}) does not take a token sequence [batch, tokens, features] (no LayerNorm, "
        "Linear, MultiheadAttention or Embedding at its input): prompt and prefix tuning need a token-sequence layer."
    )


def sequence_layers(model: nn.Module, limit: int = 24) -> list[str]:
    """Paths of ``model``'s layers that can take a soft prompt (for error messages; the first ``limit``)."""
    found = []
    for name, sub in model.named_modules():
        if not name or isinstance(sub, SoftPrompt):
            continue
        try:
            sequence_dim(sub)
        except ValueError:
            continue
        found.append(name)
    return found[:limit]


def add_soft_prompt(model: nn.Module, at: Sequence[str], num_tokens: int, init_std: float = 0.02,
                    seed: int = 0) -> list[str]:
    """Add learnable virtual tokens at the input of the layers ``at`` of a plain token-sequence module: the first
    layer gets ``num_tokens`` tokens prepended to its input (to its output for an ``nn.Embedding``); every further
    layer overwrites those positions with its own learnable tokens (prefix tuning). Each :class:`SoftPrompt` is the
    child ``soft_prompt`` of its layer; initialised from ``torch.Generator().manual_seed(seed)``. Returns ``at``."""
    check_positive("num_tokens", num_tokens, integer=True)
    if not at:
        raise ValueError("at: name at least one layer.")
    modules = dict(model.named_modules())
    missing = [path for path in at if path not in modules or not path]
    if missing:
        raise ValueError(f"at: no layer named {missing}; layers that take token sequences: {sequence_layers(model)}")
    dims = {path: sequence_dim(modules[path], f"at={path!r}") for path in at}
    generator = torch.Generator().manual_seed(seed)
    for i, path in enumerate(at):
        layer = modules[path]
        if PROMPT_NAME in layer._modules:
            raise ValueError(f"at: {path!r} already has a soft prompt.")
        prompt = SoftPrompt(num_tokens, dims[path], init_std, "prepend" if i == 0 else "replace", generator)
        param = next(layer.parameters(), None)
        if param is not None and param.is_floating_point():
            prompt.to(device=param.device, dtype=param.dtype)
        layer.add_module(PROMPT_NAME, prompt)
        if isinstance(layer, nn.Embedding):
            if i > 0:
                raise ValueError(f"at: the embedding {path!r} must come first.")
            layer.register_forward_hook(_prompt_output_hook)
        else:
            layer.register_forward_pre_hook(_prompt_pre_hook)
    return list(at)


def remove_soft_prompt(model: nn.Module) -> list[str]:
    """Remove every soft prompt :func:`add_soft_prompt` added; returns their paths."""
    removed = []
    for path, layer in list(model.named_modules()):
        if PROMPT_NAME not in layer._modules or not isinstance(layer._modules[PROMPT_NAME], SoftPrompt):
            continue
        for hooks in (layer._forward_pre_hooks, layer._forward_hooks):
            for key, hook in list(hooks.items()):
                if hook in (_prompt_pre_hook, _prompt_output_hook):
                    del hooks[key]
        del layer._modules[PROMPT_NAME]
        removed.append(path)
    return removed


def find_hf_model(model: nn.Module) -> str | None:
    """The path of the outermost ``transformers.PreTrainedModel`` inside ``model`` (``""``: the model itself), or
    ``None`` when there is none or ``transformers`` is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    for name, sub in model.named_modules():
        if isinstance(sub, transformers.PreTrainedModel):
            return name
    return None


def _task_type(hf_model: nn.Module, task_type: str) -> str:
    if task_type != "auto":
        return task_type
    name = type(hf_model).__name__
    for suffix, kind in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return kind
    return "FEATURE_EXTRACTION"


def apply_peft_prompt(model: nn.Module, path: str, method: str, num_tokens: int, task_type: str = "auto",
                      prefix_projection: bool = False) -> nn.Module:
    """Wrap the ``transformers`` model at ``path`` of ``model`` with peft prompt (``method="prompt"``) or prefix
    (``method="prefix"``) tuning and put the ``PeftModel`` where the model was; returns it. peft freezes the
    base model (classification heads stay trainable through peft's ``modules_to_save``)."""
    peft = require("peft", "finetune", "prompt / prefix tuning of a transformers model")
    check_choice("method", method, ["prompt", "prefix"])
    if not path:
        raise ValueError("the transformers model must be a submodule of the LightningModule (e.g. `self.model`).")
    hf_model = model.get_submodule(path)
    kind = _task_type(hf_model, task_type)
    if method == "prompt":
        config = peft.PromptTuningConfig(task_type=kind, num_virtual_tokens=num_tokens)
    else:
        config = peft.PrefixTuningConfig(task_type=kind, num_virtual_tokens=num_tokens,
                                         prefix_projection=prefix_projection)
        _check_prefix_support(hf_model, kind)
    wrapped = peft.get_peft_model(hf_model, config)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, wrapped)
    return wrapped


def _check_prefix_support(hf_model: nn.Module, kind: str) -> None:
    """peft's prefix tuning hands the prefix to the model as ``past_key_values``; refuse models that take none
    (e.g. BERT in transformers >= 5, and sequence classifiers whose backbone takes ``cache``) before any step
    instead of failing in the first forward."""
    def takes(fn: Any) -> bool:
        return "past_key_values" in inspect.signature(fn).parameters

    if kind == "CAUSAL_LM" or kind == "SEQ_2_SEQ_LM":
        return
    backbone = getattr(hf_model, getattr(hf_model, "base_model_prefix", ""), None)
    if takes(hf_model.forward) or (isinstance(backbone, nn.Module) and takes(backbone.forward)):
        return
    raise ValueError(
        f"PrefixTuning: {type(hf_model).__name__} takes no `past_key_values`, through which peft passes the prefix "
        f"(task {kind}); use PromptTuning, a causal LM (task_type='CAUSAL_LM'), or the plain path (at=[layers])."
    )


class _PromptCallback(LeanHooks, FinetuneSession, Callback):
    takes_over = frozenset({"configure_optimizers"})
    conflicts_with: tuple[str, ...] = ()
    changes_module = True
    _method = "prompt"

    def __init__(self, num_tokens: int, at: Sequence[str] | str | None, task_type: TaskType, init_std: float,
                 train_also: Sequence[str], seed: int, prefix_projection: bool = False) -> None:
        self.num_tokens = check_positive("num_tokens", num_tokens, integer=True)
        if at is not None and not isinstance(at, (str, list, tuple)):
            raise TypeError(f"at must be a layer path, a list of them or None, got {type(at).__name__}.")
        self.at = at
        self.task_type = check_choice("task_type", task_type, _TASK_TYPES)
        self.init_std = check_non_negative("init_std", init_std)
        self.train_also = check_targets("train_also", train_also, allow_empty=True)
        self.seed = check_number("seed", seed, integer=True)
        self.prefix_projection = bool(prefix_projection)
        self._changed: tuple[str, ...] = ()
        self._position_limit: int | None = None
        self._position_checked = False
        self.path: Literal["peft", "plain"] | None = None

    @property
    def changed_paths(self) -> tuple[str, ...]:
        """The paths changed at setup: the ``transformers`` model's (peft) or the prompted layers' (plain)."""
        return self._changed

    def _layers(self) -> list[str]:
        return [] if self.at is None else [self.at] if isinstance(self.at, str) else list(self.at)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if stage in ("validate", "test", "predict") and not self._changed:
                self._apply_for_evaluation(pl_module)
            return
        check_conflicts(trainer, self)
        name = type(self).__name__
        layers = self._layers()
        extra = resolve_targets(pl_module, self.train_also, "train_also") if self.train_also else []
        peft_types = _peft_model_types()
        already = [n for n, m in pl_module.named_modules() if peft_types and isinstance(m, peft_types)]
        prompted = [n for n, m in pl_module.named_modules() if isinstance(m._modules.get(PROMPT_NAME), SoftPrompt)]
        hf_path = None if already or prompted else find_hf_model(pl_module)
        if not already and not prompted and hf_path is None and not layers:
            raise ValueError(
                f"{name}: {type(pl_module).__name__} holds no transformers model; name the token-sequence layer(s) "
                f"with at= (layers that take token sequences: {sequence_layers(pl_module) or 'none'})."
            )
        if self._method == "prompt" and len(layers) > 1:
            raise ValueError(f"{name}: at names one layer (prefix tuning takes several), got {layers}.")
        self._begin(pl_module)
        if already:  # applied by this callback in an earlier fit of the same module
            self.path, self._changed = "peft", (already[0],)
        elif prompted:
            self.path, self._changed = "plain", tuple(prompted)
        elif hf_path is not None and (not layers or layers == [hf_path]):
            apply_peft_prompt(pl_module, hf_path, self._method, self.num_tokens, self.task_type,
                              self.prefix_projection)
            self.path, self._changed = "peft", (hf_path,)
        else:
            self.path = "plain"
            self._changed = tuple(add_soft_prompt(pl_module, layers, self.num_tokens, self.init_std, self.seed))
        if self.path == "peft":  # what peft trains: the prompt encoder (+ the heads it copies into modules_to_save)
            prefix = self._changed[0] + "." if self._changed[0] else ""
            trainable = [n for n, _ in pl_module.named_parameters() if n.startswith(prefix)
                         and (".prompt_encoder." in f".{n}" or ".modules_to_save." in n)]
        else:
            trainable = [f"{p}.{PROMPT_NAME}" for p in self._changed]
        self._train_only(pl_module, trainable + list(extra))
        # peft prepends the virtual tokens to the embedded input: a model with learned absolute positions (BERT)
        # then needs input length + num_tokens positions; checked on the first batch, before the first step
        self._position_checked = False
        self._position_limit = None
        if self.path == "peft" and self._method == "prompt":
            for sub_name, sub in pl_module.get_submodule(self._changed[0]).named_modules():
                if sub_name.endswith("position_embeddings") and isinstance(sub, nn.Embedding):
                    self._position_limit = int(sub.num_embeddings)  # learned positions (BERT, RoBERTa, ...)
                    break

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._position_limit is None or self._position_checked:
            return
        self._position_checked = True
        ids = _token_ids(batch)
        if ids is not None and ids.shape[1] + self.num_tokens > self._position_limit:
            raise ValueError(
                f"{type(self).__name__}: {ids.shape[1]} input tokens + {self.num_tokens} virtual tokens exceed the "
                f"model's {self._position_limit} learned position embeddings (max_position_embeddings); build the "
                "model with more positions or use fewer num_tokens."
            )

    def _apply_for_evaluation(self, pl_module: Any) -> None:
        """A fresh module evaluated from an adapted checkpoint (``trainer.test(module, ckpt_path=...)``): the same
        change as in fit, without freezing (peft's freezing is undone)."""
        peft_types = _peft_model_types()
        if any(peft_types and isinstance(m, peft_types) for m in pl_module.modules()) or any(
                isinstance(m._modules.get(PROMPT_NAME), SoftPrompt) for m in pl_module.modules()):
            return
        layers = self._layers()
        hf_path = find_hf_model(pl_module)
        if hf_path is not None and (not layers or layers == [hf_path]):
            self._begin(pl_module)
            apply_peft_prompt(pl_module, hf_path, self._method, self.num_tokens, self.task_type,
                              self.prefix_projection)
            self._end()
            self.path, self._changed = "peft", (hf_path,)
        elif layers:
            self.path = "plain"
            self._changed = tuple(add_soft_prompt(pl_module, layers, self.num_tokens, self.init_std, self.seed))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end()

    def state_dict(self) -> dict[str, Any]:
        return {"changed_paths": list(self._changed), "path": self.path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("changed_paths")
        if saved and self._changed and list(self._changed) != saved:
            raise ValueError(f"{type(self).__name__}: the checkpoint's prompts sit at {saved}, this run's at "
                             f"{list(self._changed)}; use the same at= to resume.")


def _token_ids(batch: Any) -> torch.Tensor | None:
    """The first 2-D integer tensor of a batch (a tensor, or a tuple / list / dict of them): the token ids."""
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for item in items:
        if torch.is_tensor(item) and item.ndim == 2 and not item.is_floating_point() and item.dtype != torch.bool:
            return item
    return None


def _peft_model_types() -> tuple[type, ...]:
    try:
        from peft import PeftModel
    except ImportError:
        return ()
    return (PeftModel,)


class PromptTuning(_PromptCallback):
    """Prompt tuning (Lester et al. 2021): ``num_tokens`` learnable virtual tokens in front of the input sequence,
    everything else frozen; only the prompt (and ``train_also``) trains and reaches the optimizer.

    Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021.

    * If the module holds a Hugging Face ``transformers`` model (found automatically, or named by ``at``), peft's
      ``PromptTuningConfig`` wraps it (``get_peft_model``) and the attribute holds the ``PeftModel`` after ``fit``
      (peft extends the attention mask; a sequence-classification head trains too, peft's ``modules_to_save``).
      A model with learned positions (BERT) needs the input length plus ``num_tokens`` of them: checked on the
      first batch, before the first step.
    * On a plain token-sequence module, ``at`` names the layer whose input ``[batch, tokens, features]`` gets the
      tokens prepended (a forward pre-hook; an ``nn.Embedding``'s output instead), e.g. ``at="blocks.0"`` of the
      demo ``TinyTransformer``. Later layers then see ``num_tokens`` more tokens: pooling over tokens includes them,
      position embeddings added after ``at`` and masks are the user's to extend.

    A module with neither (a CNN, or ``at`` naming a convolution) is refused at setup, listing the layers that take
    token sequences. After ``fit`` the module keeps the prompt (:attr:`changed_paths`); parameters outside it get
    their ``requires_grad`` back.

    Args:
        num_tokens: the number of virtual tokens (``> 0``).
        at: ``None`` (the transformers model inside the module), the path of the transformers model, or the layer
            of a plain module whose input receives the prompt.
        task_type: peft's task type for a transformers model (``"auto"``: from its class name).
        init_std: std of the plain path's initial tokens.
        train_also: names / regular expressions of submodules that train too (e.g. ``["head"]``).
        seed: seed of the plain path's initialisation.

    Example::

        from lightning_techniques import PromptTuning
        prompt = PromptTuning(num_tokens=4)   # peft on the transformers model inside TinyBert
        L.Trainer(max_epochs=5, callbacks=[prompt]).fit(TinyBert(max_length=16), datamodule=TokenPresenceDataModule())
        soft = PromptTuning(num_tokens=4, at="blocks.0", train_also=["head"])   # a plain token-sequence module
        L.Trainer(max_epochs=5, callbacks=[soft]).fit(TinyTransformer(), datamodule=DigitsDataModule())

    Limits: the plain path knows nothing of attention masks or positions added after ``at``, and a layer whose input
    is not ``[batch, tokens, features]`` fails at the first forward with a message naming the shape. One
    parameter-efficient method per run. FSDP/DeepSpeed are not supported.
    """

    _method = "prompt"
    conflicts_with: tuple[str, ...] = other_methods("PromptTuning")

    def __init__(self, num_tokens: int = 8, at: str | None = None, task_type: TaskType = "auto",
                 init_std: float = 0.02, train_also: Sequence[str] = (), seed: int = 0) -> None:
        super().__init__(num_tokens, at, task_type, init_std, train_also, seed)


class PrefixTuning(_PromptCallback):
    """Prefix tuning (Li & Liang 2021): learnable activations for ``num_tokens`` prefix positions at every layer,
    everything else frozen; only the prefix (and ``train_also``) trains and reaches the optimizer.

    Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021.

    * A Hugging Face ``transformers`` model inside the module (found automatically, or named by ``at``): peft's
      ``PrefixTuningConfig`` (keys/values of every attention layer, optional reparametrisation MLP
      ``prefix_projection``). peft passes the prefix as ``past_key_values``: models that take none (BERT in
      transformers >= 5; sequence classifiers whose backbone takes ``cache``) are refused at setup - causal LMs work.
    * A plain token-sequence module: ``at`` lists the layers (e.g. ``["blocks.0", "blocks.1"]``); the first gets the
      prefix tokens prepended to its input, each further one overwrites the prefix positions of its input with its
      own learnable activations (Li & Liang's ``h_i = P[i]`` for prefix positions, at the layer inputs).

    Args:
        num_tokens: the prefix length (``> 0``).
        at: ``None`` / the transformers model's path, or the plain module's layers (first one prepends).
        task_type: peft's task type (``"auto"``: from the class name).
        prefix_projection: peft's MLP reparametrisation of the prefix.
        init_std: std of the plain path's initial activations.
        train_also: names / regular expressions of submodules that train too.
        seed: seed of the plain path's initialisation.

    Example::

        from lightning_techniques import PrefixTuning
        prefix = PrefixTuning(num_tokens=4, at=["blocks.0", "blocks.1"], train_also=["head"])
        L.Trainer(max_epochs=5, callbacks=[prefix]).fit(TinyTransformer(), datamodule=DigitsDataModule())

    Limits: as :class:`PromptTuning`.
    """

    _method = "prefix"
    conflicts_with: tuple[str, ...] = other_methods("PrefixTuning")

    def __init__(self, num_tokens: int = 8, at: Sequence[str] | str | None = None, task_type: TaskType = "auto",
                 prefix_projection: bool = False, init_std: float = 0.02, train_also: Sequence[str] = (),
                 seed: int = 0) -> None:
        super().__init__(num_tokens, at, task_type, init_std, train_also, seed, prefix_projection)
