"""Configuration of the OFT variant (StarVLA QwenOFT): parallel L1 regression from action-query tokens."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from ...configuration_vla import VLAConfig


@strict
class VLAOFTConfig(VLAConfig):
    r"""
    OFT: `action_horizon` placeholder tokens are appended to the prompt; the backbone's last-layer hidden state at each
    one is mapped by an MLPResNet to one action step, all steps in one forward pass, trained with an L1 loss.

    Args:
        action_token (`str`, *optional*, defaults to `"<|fim_pad|>"`):
            The placeholder. It must be one token under the backbone's tokenizer; Qwen's `<|fim_pad|>` is a special
            token in every Qwen tokenizer (StarVLA used "🔍", which splits under Qwen3.5's tokenizer).
        action_token_id (`int`, *optional*):
            Its id, filled in by `from_vlm` from the tokenizer.
        action_query_suffix (`str`, *optional*):
            Text appended to the instruction; `{horizon}` is the chunk length and `{queries}` the placeholders.
        head_hidden_dim (`int`, *optional*):
            Width of the MLPResNet; defaults to twice the VLM hidden size, as in StarVLA.
        head_num_blocks (`int`, *optional*, defaults to 2):
            Number of residual blocks.
    """

    model_type = "vla_oft"

    state_in_prompt: bool = True
    action_token: str = "<|fim_pad|>"
    action_token_id: int | None = None
    action_query_suffix: str = " Please predict the next {horizon} robot actions: <action>{queries}<action>."
    head_hidden_dim: int | None = None
    head_num_blocks: int = 2

    def validate_architecture(self):
        super().validate_architecture()
        if "{queries}" not in self.action_query_suffix:
            raise ValueError(f"action_query_suffix must contain '{{queries}}', got {self.action_query_suffix!r}")


__all__ = ["VLAOFTConfig"]
