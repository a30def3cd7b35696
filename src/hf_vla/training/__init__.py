"""Training with transformers' Trainer: `VLATrainer`, per-module learning rates and freezing, co-training; PEFT LoRA
(`add_lora`) and TRL stages (`VLMSFTTrainer`, GRPO for token heads: `build_grpo_trainer`, `action_reward`).

Names are imported lazily: `python -m hf_vla.training.<module>` runs each module cleanly, and importing trl (slow) waits
for its first use.
"""

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "add_lora": "lora",
    "lora_config": "lora",
    "build_param_groups": "param_groups",
    "flatten_paths": "param_groups",
    "freeze_modules": "param_groups",
    "DEFAULT_LOSS_SCALE": "trainer",
    "VLATrainer": "trainer",
    "action_error_metrics": "trainer",
    "VLMSFTTrainer": "trl",
    "action_reward": "trl",
    "build_grpo_trainer": "trl",
    "decode_completions": "trl",
    "grpo_prompt_dataset": "trl",
    "image_only_processor": "trl",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
