"""Parameter-efficient fine-tuning: LoRA and its relatives, QLoRA, prompt and prefix tuning, adapters.

These techniques change the model on purpose (they insert adapters, or merge them into the base weights); each
registry entry declares that change, and the contract checks that nothing else is left behind.
"""

from lightning_techniques.finetune.adalora import AdaLoRA, apply_adalora, current_ranks, orthogonal_regularization
from lightning_techniques.finetune.adapters import Adapters, BottleneckAdapter, add_adapters, remove_adapters
from lightning_techniques.finetune.lora import LoRA, apply_lora, load_adapter, merge_lora, save_adapter
from lightning_techniques.finetune.prompt import (
    PrefixTuning,
    PromptTuning,
    SoftPrompt,
    add_soft_prompt,
    apply_peft_prompt,
    remove_soft_prompt,
)
from lightning_techniques.finetune.qlora import QLoRA, base_weight_bytes, quantize_linear_4bit
from lightning_techniques.finetune.relora import ReLoRA, prune_optimizer_state, relora_lr_factor, relora_restart

__all__: list[str] = []
# issue #11, helper LORA: LoRA (and DoRA / IA3 / LoHa / LoKr), QLoRA
__all__ += ["LoRA", "apply_lora", "merge_lora", "save_adapter", "load_adapter", "QLoRA", "quantize_linear_4bit",
            "base_weight_bytes"]
# issue #11, helper FT2: ReLoRA, AdaLoRA, prompt / prefix tuning, adapters
__all__ += ["Adapters", "BottleneckAdapter", "add_adapters", "remove_adapters", "ReLoRA", "relora_restart",
            "prune_optimizer_state", "relora_lr_factor", "AdaLoRA", "apply_adalora", "orthogonal_regularization",
            "current_ranks", "PromptTuning", "PrefixTuning", "SoftPrompt", "add_soft_prompt", "remove_soft_prompt",
            "apply_peft_prompt"]
