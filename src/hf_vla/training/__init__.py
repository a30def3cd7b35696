"""Training with transformers' Trainer: `VLATrainer`, per-module learning rates and freezing, co-training."""

from .param_groups import build_param_groups, flatten_paths, freeze_modules
from .trainer import DEFAULT_LOSS_SCALE, VLATrainer, action_error_metrics

__all__ = ["DEFAULT_LOSS_SCALE", "VLATrainer", "action_error_metrics", "build_param_groups", "flatten_paths",
           "freeze_modules"]
