"""Configuration of the GR00T variant (StarVLA QwenGR00T): a flow-matching DiT on the last VLM layer."""

from huggingface_hub.dataclasses import strict

from ..flow_matching_config import VLAFlowMatchingConfig


@strict
class VLAGR00TConfig(VLAFlowMatchingConfig):
    r"""
    Dual system: the VLM (system 2) runs once; a DiT (system 1) cross-attends to its last-layer hidden states in
    every even block, self-attends in odd blocks, and integrates a velocity field over `num_inference_steps` steps.
    Defaults are StarVLA's: DiT-B (D = 768, 12 heads × 64), 16 blocks, output 1024, 8 repeated diffusion steps.
    """

    model_type = "vla_gr00t"

    dit_hidden_size: int | None = 768
    num_dit_layers: int | None = 16
    repeated_diffusion_steps: int = 8


__all__ = ["VLAGR00TConfig"]


if __name__ == "__main__":
    from ...testing import describe_published

    describe_published("gr00t", "qwen2_5_vl_3b")
    describe_published("gr00t", "qwen3_vl_4b")
