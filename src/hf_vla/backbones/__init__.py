"""One adapter per VLM family: how to build it, run it for hidden states, and lay out its prompt and image tokens."""

from .base import BackboneAdapter
from .qwen_vl import QwenVLAdapter

BACKBONE_ADAPTERS: dict[str, BackboneAdapter] = {
    "qwen2_5_vl": QwenVLAdapter(),
    "qwen3_vl": QwenVLAdapter(),
}


def get_backbone_adapter(vlm_config) -> BackboneAdapter:
    """The adapter for a VLM config (object or dict) or a bare model_type string."""
    if isinstance(vlm_config, str):
        model_type = vlm_config
    elif isinstance(vlm_config, dict):
        model_type = vlm_config.get("model_type")
    else:
        model_type = vlm_config.model_type
    if model_type not in BACKBONE_ADAPTERS:
        raise ValueError(f"vlm_config.model_type: no backbone adapter for {model_type!r}; supported: {sorted(BACKBONE_ADAPTERS)}")
    return BACKBONE_ADAPTERS[model_type]


__all__ = ["BackboneAdapter", "QwenVLAdapter", "BACKBONE_ADAPTERS", "get_backbone_adapter"]
