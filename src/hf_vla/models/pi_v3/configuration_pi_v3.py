"""Configuration of the PI_v3 variant (StarVLA QwenPI_v3): compressed layer-wise DiT, state in the prompt."""

from huggingface_hub.dataclasses import strict

from ..pi.configuration_pi import VLAPIConfig


@strict
class VLAPIv3Config(VLAPIConfig):
    r"""
    As PI, but each VLM layer is projected (LayerNorm + Linear) to a narrower DiT (D = 1024 by default, 16 heads), and
    the state is written into the instruction as 256 uniform bins between `[STATE]` and `[ACTION]`.

    `interleave_self_attention=False` ("all-cross": every block cross-attends to its layer) is what checkpoints trained
    before StarVLA PR #373 (2026-06) compute and StarVLA's default for QwenPI_v3 since #434; `True` gives the
    interleaved cross/self form. Weight shapes are identical in both modes.
    """

    model_type = "vla_pi_v3"

    dit_hidden_size: int | None = 1024
    state_in_prompt: bool = True
    interleave_self_attention: bool = False
    repeated_diffusion_steps: int = 16


__all__ = ["VLAPIv3Config"]


if __name__ == "__main__":
    from ...testing import describe_published

    describe_published("pi_v3", "qwen2_5_vl_3b")
    describe_published("pi_v3", "qwen3_vl_4b")
