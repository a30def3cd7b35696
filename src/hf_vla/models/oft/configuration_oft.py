"""Configuration of the OFT variant (StarVLA QwenOFT): parallel L1 regression from action-query tokens."""

import string

from huggingface_hub.dataclasses import strict

from ...configuration_vla import VLAConfig, check_at_least


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
        check_at_least(self, head_hidden_dim=1, head_num_blocks=0)
        fields = {name for _, name, _, _ in string.Formatter().parse(self.action_query_suffix) if name is not None}
        if "queries" not in fields or fields - {"queries", "horizon"}:
            raise ValueError("action_query_suffix: expected a text with '{queries}' (and optionally '{horizon}'), got "
                             f"{self.action_query_suffix!r}")


__all__ = ["VLAOFTConfig"]


if __name__ == "__main__":
    from ...testing import describe_published

    describe_published("oft", "qwen2_5_vl_3b")
    describe_published("oft", "qwen3_vl_4b")
