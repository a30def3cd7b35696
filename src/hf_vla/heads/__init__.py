"""Action heads, backbone-agnostic: they see condition tensors, never a VLM."""

from .mlp_resnet import MLPResNet, MLPResNetBlock

__all__ = ["MLPResNet", "MLPResNetBlock"]
