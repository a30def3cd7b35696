"""Configuration of the PI variant (StarVLA QwenPI, formerly QwenFM): a layer-wise flow-matching DiT."""

from huggingface_hub.dataclasses import strict

from ..flow_matching_config import VLAFlowMatchingConfig


@strict
class VLAPIConfig(VLAFlowMatchingConfig):
    r"""
    Layer-wise: the DiT has one block per VLM layer, at the VLM's width, and block i cross-attends to the output of VLM
    layer i (with `interleave_self_attention`, odd blocks self-attend instead). The action decoder reads the DiT's
    last hidden states; `proj_out_*` exist (output 26) only so StarVLA checkpoints map key for key.
    Defaults are StarVLA's: D = VLM hidden size, heads of 64, 2 repeated diffusion steps, interleaving on.
    """

    model_type = "vla_pi"

    dit_output_dim: int = 26
    repeated_diffusion_steps: int = 2


__all__ = ["VLAPIConfig"]


if __name__ == "__main__":
    from ...testing import describe_published

    describe_published("pi", "qwen2_5_vl_3b")
    describe_published("pi", "qwen3_vl_4b")
