"""QLoRA (Dettmers et al. 2023): the base ``nn.Linear`` layers quantised to 4-bit NF4 with bitsandbytes, LoRA on
top - on the CPU as on the GPU.

Functional core: :func:`quantize_linear_4bit` (replace chosen ``nn.Linear`` layers by bitsandbytes ``Linear4bit``
with their weights packed to 4 bits right away, on the CPU), :func:`base_weight_bytes` (bytes of the quantised
base weights, quantisation state included). Thin Lightning adapter: :class:`QLoRA`.

Written here, not taken from Lightning: Lightning's ``BitsandbytesPrecision`` refuses non-CUDA devices and
quantises when the model moves to the GPU; this quantises in ``setup`` on whatever device the module is on
(bitsandbytes >= 0.45 packs 4-bit weights on the CPU), so the same run works on a laptop and on a GPU. The layers
are bitsandbytes', the adapters peft's (its 4-bit LoRA layer, which merges by dequantise-add-requantise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice
from lightning_techniques.finetune._peft import tuner_layers
from lightning_techniques.finetune._trainable import check_targets
from lightning_techniques.finetune.lora import LoRA, apply_lora, resolve_lora_targets

QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bitsandbytes_module(feature: str = "QLoRA") -> Any:
    """``import bitsandbytes`` or an ``ImportError`` naming the ``finetune`` extra."""
    return require("bitsandbytes", "finetune", feature)


def _load_prequantized(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of a quantised layer: a ``state_dict`` written by a 4-bit layer holds the packed
    weight plus its quantisation state (``weight.absmax`` ...): rebuild the packed parameter from them (bitsandbytes'
    ``Params4bit.from_prequantized``) instead of refusing the extra keys."""
    stats = {key[len(prefix + "weight."):]: state_dict.pop(key) for key in list(state_dict)
             if key.startswith(prefix + "weight.")}
    if not stats or prefix + "weight" not in state_dict:
        return
    bnb = bitsandbytes_module()
    data = state_dict[prefix + "weight"]  # left in place: the default loading copies it into the new parameter
    device = module.weight.device
    module.weight = bnb.nn.Params4bit.from_prequantized(data=data.clone(), quantized_stats=stats, requires_grad=False,
                                                        device=device, module=module)


def _keep_cpu_layout(layer: nn.Module) -> None:
    """Switch off bitsandbytes' AVX512-BF16 CPU inference layout for ``layer``. On CPUs with AVX512-BF16 (Intel
    Sapphire Rapids and later) ``Linear4bit.forward`` repacks the weight in place the first time it runs in eval mode
    without gradients - a Lightning validation loop - and that layout needs ``out_features`` divisible by 32
    (``AssertionError: N must be divisible by block_n`` otherwise) and breaks the next training forward (an
    in-place operation on a view of a leaf that requires grad). Training alternates with validation, so the layer
    keeps the layout every CPU and GPU uses; only eval-mode CPU matmuls of such CPUs lose their faster kernel."""
    setattr(layer, "support_avx512bf16_for_cpu", False)  # noqa: B010 (nn.Module.__setattr__ is typed for tensors)


def quantize_linear_4bit(model: nn.Module, paths: Sequence[str], quant_type: str = "nf4", double_quant: bool = True,
                         compute_dtype: str = "float32", blocksize: int = 64) -> list[str]:
    """Replace the ``nn.Linear`` layers of ``model`` at ``paths`` by bitsandbytes ``Linear4bit`` layers whose weights
    are quantised now, on the layer's current device (CPU included): 4-bit NF4 (or FP4) codes, two per byte, one
    absmax per ``blocksize`` weights (itself quantised to 8 bits with ``double_quant``); biases stay in full
    precision; matmuls run in ``compute_dtype``. Returns the paths. The layers load their own ``state_dict``
    (packed weight + quantisation state) back."""
    bnb = bitsandbytes_module()
    check_choice("quant_type", quant_type, ["nf4", "fp4"])
    check_choice("compute_dtype", compute_dtype, list(_DTYPES))
    done = []
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, bnb.nn.Linear4bit):
            _keep_cpu_layout(layer)
            done.append(path)
            continue
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"quantize_linear_4bit: {path!r} is a {type(layer).__name__}, not an nn.Linear.")
        device = layer.weight.device
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=_DTYPES[compute_dtype], compress_statistics=double_quant,
                                      quant_type=quant_type, device="meta")
        quantized.weight = bnb.nn.Params4bit(layer.weight.data.detach().to("cpu", torch.float32).clone(),
                                             requires_grad=False, compress_statistics=double_quant,
                                             quant_type=quant_type, blocksize=blocksize, module=quantized)
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.data.detach().clone(), requires_grad=layer.bias.requires_grad)
        quantized.train(layer.training)
        quantized = quantized.to(device if device.type != "meta" else "cpu")  # packs the weight (CPU or CUDA)
        quantized._register_load_state_dict_pre_hook(_load_prequantized, with_module=True)
        _keep_cpu_layout(quantized)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, quantized)
        done.append(path)
    return done


def base_weight_bytes(model: nn.Module, paths: Sequence[str] | None = None) -> tuple[int, int]:
    """``(quantised, fp32)``: bytes of the 4-bit base weights of the quantised layers at ``paths`` (all when None) -
    packed codes plus the whole quantisation state (absmax, code book, nested statistics) - and bytes the same
    weights take in fp32."""
    bnb = bitsandbytes_module()
    quantized = full = 0
    for path, layer in model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit) or (paths is not None and not any(
                path == p or path.startswith(p + ".") for p in paths)):
            continue
        weight = layer.weight
        quantized += weight.numel() * weight.element_size()
        state = weight.quant_state
        for value in state.as_dict(packed=True).values() if state is not None else ():
            if isinstance(value, torch.Tensor):
                quantized += value.numel() * value.element_size()
        full += layer.in_features * layer.out_features * 4
    return quantized, full


class QLoRA(LoRA):
    """QLoRA (Dettmers et al. 2023): the base ``nn.Linear`` layers quantised to 4-bit NF4 with bitsandbytes and
    frozen, LoRA adapters on top, trained in ``compute_dtype`` - on the CPU and on the GPU.

    Dettmers, Pagnoni, Holtzman & Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023: NF4
    (4-bit NormalFloat) codes with one absmax per 64 weights, optionally double-quantised (the absmax values
    themselves 8-bit), the LoRA update computed in a higher-precision compute dtype.

    In ``setup`` (before ``configure_optimizers``) the selected ``nn.Linear`` layers are replaced by bitsandbytes
    ``Linear4bit`` layers quantised right there on the module's device (:func:`quantize_linear_4bit`; Lightning's
    ``BitsandbytesPrecision`` needs CUDA, this does not) and get peft's 4-bit LoRA layers; then everything works as
    in :class:`LoRA`: only the adapters train and reach the optimizer, ``requires_grad`` of the rest is given back
    at the end, resume is exact (a checkpoint holds the packed base weights and their quantisation state, which the
    quantised layers load back), ``adapter_only_checkpoints`` keeps only the adapters. After ``fit`` the module
    keeps its quantised layers with adapters (the declared change, :attr:`changed_paths`).

    Args:
        targets: the ``nn.Linear`` layers to quantise and adapt (paths, regular expressions, layer types; default:
            every ``nn.Linear``); a model with none is refused at setup.
        rank, alpha, dropout: the LoRA adapters' (see :class:`LoRA`).
        quant_type: ``"nf4"`` (the paper's) or ``"fp4"``.
        double_quant: quantise the absmax statistics too (saves about 0.37 bit per weight).
        compute_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (the matmul / LoRA dtype).
        adapter_only_checkpoints, train_also: as in :class:`LoRA`.

    Example::

        from lightning_techniques import QLoRA
        qlora = QLoRA(targets="Linear", rank=4, alpha=8)
        L.Trainer(max_steps=20, callbacks=[qlora]).fit(DeepMLP(depth=3, width=64), datamodule=DigitsDataModule())

    Limits: needs the ``finetune`` extra (bitsandbytes); only ``nn.Linear`` layers are quantised; no merge (a merged
    4-bit weight would be re-quantised: use :class:`LoRA` on a full-precision model for a merged result); FSDP /
    DeepSpeed are not supported; float16 compute on the CPU is slow.
    """

    conflicts_with: tuple[str, ...] = ("LoRA", "ReLoRA", "AdaLoRA", "PromptTuning", "PrefixTuning", "Adapters")

    def __init__(self, targets: Sequence[str] | str = ("Linear",), rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, quant_type: QuantType = "nf4", double_quant: bool = True,
                 compute_dtype: ComputeDtype = "float32", adapter_only_checkpoints: bool = False,
                 train_also: Sequence[str] = ()) -> None:
        bitsandbytes_module("QLoRA")  # the extra's error at construction, before any run
        super().__init__(targets=check_targets("targets", targets), method="lora", rank=rank, alpha=alpha,
                         dropout=dropout, merge=False, adapter_only_checkpoints=adapter_only_checkpoints,
                         train_also=train_also)
        self.quant_type = check_choice("quant_type", quant_type, ["nf4", "fp4"])
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {double_quant!r}.")
        self.double_quant = double_quant
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, list(_DTYPES))

    def _apply(self, pl_module: nn.Module) -> list[str]:
        bnb = bitsandbytes_module()
        if not any(isinstance(m, (nn.Linear, bnb.nn.Linear4bit)) for m in pl_module.modules()):
            raise ValueError(f"QLoRA: {type(pl_module).__name__} has no nn.Linear layer to quantise; QLoRA quantises "
                             "nn.Linear layers only (use LoRA for other layer types).")
        paths = resolve_lora_targets(pl_module, self.targets, "lora", layer_types=(nn.Linear,))
        existing = tuner_layers(pl_module)
        fresh = [p for p in paths if p not in existing]
        quantize_linear_4bit(pl_module, fresh, self.quant_type, self.double_quant, self.compute_dtype)
        # peft picks its 4-bit LoRA layer for models "loaded in 4 bit": say so for the injection only
        had = "is_loaded_in_4bit" in vars(pl_module)
        previous = vars(pl_module).get("is_loaded_in_4bit")
        vars(pl_module)["is_loaded_in_4bit"] = True
        try:
            return apply_lora(pl_module, paths, "lora", self.rank, self.alpha, self.dropout)
        finally:
            if had:
                vars(pl_module)["is_loaded_in_4bit"] = previous
            else:
                vars(pl_module).pop("is_loaded_in_4bit", None)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "quant_type": self.quant_type, "double_quant": self.double_quant}

