"""Training with transformers' Trainer: `VLATrainer`, per-module learning rates and freezing, co-training; PEFT LoRA
(`add_lora`) and TRL stages (`VLMSFTTrainer`, GRPO for token heads: `build_grpo_trainer`, `action_reward`)."""

from .lora import add_lora, lora_config
from .param_groups import build_param_groups, flatten_paths, freeze_modules
from .trainer import DEFAULT_LOSS_SCALE, VLATrainer, action_error_metrics
from .trl import action_reward, build_grpo_trainer, decode_completions, grpo_prompt_dataset, image_only_processor

__all__ = ["DEFAULT_LOSS_SCALE", "VLATrainer", "VLMSFTTrainer", "action_error_metrics", "action_reward", "add_lora",
           "build_grpo_trainer", "build_param_groups", "decode_completions", "flatten_paths", "freeze_modules",
           "grpo_prompt_dataset", "image_only_processor", "lora_config"]


def __getattr__(name):  # importing trl is slow: VLMSFTTrainer (an SFTTrainer subclass) is built on first use
    if name == "VLMSFTTrainer":
        from . import trl

        return trl.VLMSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
