"""Configuration of the bins variant (OpenVLA / LLaVA-VLA): each action dimension as one of N uniform bins."""

from huggingface_hub.dataclasses import strict

from ...configuration_vla import check_at_least
from ..token_actions import VLATokenActionConfig


@strict
class VLABinsConfig(VLATokenActionConfig):
    r"""
    Every normalised action value is discretised on OpenVLA's grid (`hf_vla.action_tokenizers.UniformBins`:
    `num_action_tokens` uniform edges over [-1, 1], its np.digitize bin as the token); token k is
    `<robot_action_k>`, and a chunk is T·D such tokens, time-major. The state, when given, is written into the prompt
    with the same tokens (LLaVA-VLA's proprioception tokens).

    Args:
        num_action_tokens (`int`, *optional*, defaults to 256): number of tokens (OpenVLA's `n_action_bins`: 255
            intervals and a last token for values at 1).
        state_as_action_tokens (`bool`, *optional*, defaults to `True`): write the state bins as action tokens
            (`<robot_action_k>`) rather than as numbers.
        concat_views (`bool`, *optional*, defaults to `False`): stack the camera views vertically into one image
            (LLaVA-VLA) instead of one image per view.
    """

    model_type = "vla_bins"

    num_action_tokens: int = 256
    state_in_prompt: bool = True
    state_as_action_tokens: bool = True
    concat_views: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        check_at_least(self, num_action_tokens=2)  # the edges of at least one interval


__all__ = ["VLABinsConfig"]


if __name__ == "__main__":
    from ...testing import describe_published

    describe_published("bins", "qwen2_5_vl_3b")
    describe_published("bins", "qwen3_vl_4b")
