"""Configuration of the FAST variant (StarVLA QwenFast): DCT + BPE action tokens decoded autoregressively."""

from huggingface_hub.dataclasses import strict

from ..token_actions import VLATokenActionConfig


@strict
class VLAFASTConfig(VLATokenActionConfig):
    r"""
    The action chunk is compressed by a FAST tokenizer (per-dimension DCT, scaled and rounded, then a BPE over the
    coefficients) into a variable number of tokens; token k is the VLM token `<robot_action_k>`.

    Args:
        num_action_tokens (`int`, *optional*, defaults to 2048): the FAST vocabulary (2048 for the universal
            tokenizer, as StarVLA's -Action models).
        max_action_tokens (`int`, *optional*, defaults to 256): decoding budget of one reply.
    """

    model_type = "vla_fast"

    num_action_tokens: int = 2048
    max_action_tokens: int = 256


__all__ = ["VLAFASTConfig"]


if __name__ == "__main__":
    from ...testing import describe_published

    describe_published("fast", "qwen2_5_vl_3b")
    describe_published("fast", "qwen3_vl_4b")
