"""Action heads, backbone-agnostic: they see condition tensors, never a VLM."""

from .dit import DiT
from .flow_matching import FlowMatchingActionHead
from .mlp_resnet import MLPResNet, MLPResNetBlock

__all__ = ["DiT", "FlowMatchingActionHead", "MLPResNet", "MLPResNetBlock"]
