"""Parameter-efficient fine-tuning: LoRA and its relatives, QLoRA, prompt and prefix tuning, adapters.

These techniques change the model on purpose (they insert adapters, or merge them into the base weights); each
registry entry declares that change, and the contract checks that nothing else is left behind.
"""

__all__: list[str] = []
