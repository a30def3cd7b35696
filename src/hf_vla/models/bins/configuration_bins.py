"""Configuration of the bins variant (OpenVLA / LLaVA-VLA): each action dimension as one of N uniform bins."""

from huggingface_hub.dataclasses import strict

from ..token_actions import VLATokenActionConfig


@strict
class VLABinsConfig(VLATokenActionConfig):
    r"""
    Every normalised action value in [-1, 1] falls into one of `num_action_tokens` uniform bins; bin k is the token
    `<robot_action_k>`, and a chunk is T·D such tokens, time-major. The state, when given, is written into the prompt
    with the same tokens (LLaVA-VLA's proprioception tokens).

    Args:
        num_action_tokens (`int`, *optional*, defaults to 256): number of bins.
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


__all__ = ["VLABinsConfig"]
