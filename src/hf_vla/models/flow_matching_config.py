"""Head fields shared by the flow-matching variants' configurations (StarVLA's defaults)."""

from huggingface_hub.dataclasses import strict

from ..configuration_vla import VLAConfig, check_at_least

CONDITION_MASKS = ("always", "training", "never")


@strict
class VLAFlowMatchingConfig(VLAConfig):
    r"""
    Args:
        dit_hidden_size (`int`, *optional*): width D of the DiT (None: the VLM hidden size, as QwenPI).
        num_dit_layers (`int`, *optional*): number of DiT blocks (None: the number of VLM layers, layer-wise heads;
            fewer blocks read the last VLM layers, block i of N the layer L − N + i).
        attention_head_dim (`int`, *optional*, defaults to 64): width of one attention head.
        dit_output_dim (`int`, *optional*, defaults to 1024): width of the DiT's `proj_out_2`.
        head_hidden_size (`int`, *optional*, defaults to 1024): hidden width of the state encoder and action decoder.
        dropout (`float`, *optional*, defaults to 0.2) / final_dropout (`bool`, defaults to `True`): DiT dropout.
        interleave_self_attention (`bool`): odd blocks self-attend; False makes every block cross-attend.
        num_future_tokens (`int`, defaults to 32), max_seq_len (`int`, defaults to 1024): learned tokens.
        repeated_diffusion_steps (`int`): copies of each sample per training step, each with its own noise and time.
        num_inference_steps (`int`, defaults to 4): Euler steps of `predict_action`.
        time_beta_alpha / time_beta_beta / time_noise_s: training time t = (s − u)/s, u ~ Beta(α, β).
        condition_mask (`str`, *optional*, defaults to `"always"`): when the prompt's padding mask hides padded
            condition tokens from the DiT: `"always"` (current StarVLA), `"training"` (in training only) or `"never"`
            (StarVLA before its masking fix). Only left-padded batches differ; converted StarVLA checkpoints set the
            behaviour of the code that trained them.
    """

    dit_hidden_size: int | None = None
    num_dit_layers: int | None = None
    attention_head_dim: int = 64
    dit_output_dim: int = 1024
    head_hidden_size: int = 1024
    dropout: float | int = 0.2
    final_dropout: bool = True
    interleave_self_attention: bool = True
    num_future_tokens: int = 32
    max_seq_len: int = 1024
    repeated_diffusion_steps: int = 1
    num_inference_steps: int = 4
    time_beta_alpha: float | int = 1.5
    time_beta_beta: float | int = 1.0
    time_noise_s: float | int = 0.999
    condition_mask: str = "always"

    def validate_architecture(self):
        super().validate_architecture()
        check_at_least(self, dit_hidden_size=1, num_dit_layers=1, attention_head_dim=1, dit_output_dim=1,
                       head_hidden_size=1, num_future_tokens=0, max_seq_len=self.action_horizon,
                       repeated_diffusion_steps=1, num_inference_steps=1)  # fmt: skip
        if self.dit_hidden_size is not None and self.dit_hidden_size % self.attention_head_dim:
            raise ValueError(f"dit_hidden_size: expected a multiple of attention_head_dim {self.attention_head_dim}, "
                             f"got {self.dit_hidden_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        if not 0 < self.time_noise_s <= 1:  # t = (s − u)/s
            raise ValueError(f"time_noise_s: expected s in (0, 1], got {self.time_noise_s}")
        for name in ("time_beta_alpha", "time_beta_beta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a Beta parameter > 0, got {getattr(self, name)}")
        if self.condition_mask not in CONDITION_MASKS:
            raise ValueError(f"condition_mask: expected one of {CONDITION_MASKS}, got {self.condition_mask!r}")


if __name__ == "__main__":
    from .gr00t.configuration_gr00t import VLAGR00TConfig
    from .pi.configuration_pi import VLAPIConfig
    from .pi_v3.configuration_pi_v3 import VLAPIv3Config

    fields = ("dit_hidden_size", "num_dit_layers", "interleave_self_attention", "repeated_diffusion_steps",
              "state_in_prompt", "condition_mask")  # fmt: skip
    print("StarVLA's defaults where the flow-matching variants differ (None: from the VLM):")
    for config_class in (VLAGR00TConfig, VLAPIConfig, VLAPIv3Config):
        config = config_class()
        print(f"  {config.model_type:>10}: " + ", ".join(f"{name}={getattr(config, name)}" for name in fields))
