"""VLAConfig: the fields every VLA variant shares — a VLM backbone sub-config and the action/state interface."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


def check_at_least(config, **minimums: int) -> None:
    """Raises, naming the field, where a field set (not None) is below its minimum."""
    for name, minimum in minimums.items():
        value = getattr(config, name, None)
        if value is not None and value < minimum:
            raise ValueError(f"{name}: expected ≥ {minimum}, got {value}")


@strict
class VLAConfig(PreTrainedConfig):
    r"""
    Base configuration of a vision-language-action model: a VLM backbone plus an action head.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the VLM backbone, any family with an adapter in `hf_vla.backbones` (Qwen2.5-VL by
            default). Saved nested in `config.json`, as transformers' PI0 does.
        action_dim (`int`, *optional*, defaults to 7):
            Dimension of one action step (e.g. xyz delta, rpy delta, gripper).
        action_horizon (`int`, *optional*, defaults to 16):
            Number of future action steps predicted per call (the chunk length).
        state_dim (`int`, *optional*, defaults to 0):
            Dimension of the proprioceptive state; 0 means the model takes no state.
        state_in_prompt (`bool`, *optional*, defaults to `False`):
            Whether the processor writes the state into the prompt as 256 uniform bins between `[STATE]` and
            `[ACTION]` (StarVLA's OFT and PI_v3) instead of passing it to a state encoder.
        prompt_template (`str`, *optional*, defaults to `"{instruction}"`):
            Text of the user turn; `{instruction}` is replaced by the instruction (plus state text and action-query
            suffix where the variant uses them). StarVLA's released recipes use a chain-of-thought template here.
        base_vlm (`str`, *optional*):
            Hub id or path of the VLM the backbone was initialised from (recorded by `from_vlm`, used as the model
            card's `base_model`).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of the head's linear layers.
    """

    model_type = "vla"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    action_dim: int = 7
    action_horizon: int = 16
    state_dim: int = 0
    state_in_prompt: bool = False
    prompt_template: str = "{instruction}"
    base_vlm: str | None = None
    initializer_range: float | int = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Weights tied inside the backbone (Qwen2.5-VL-3B, Qwen3-VL-4B) stay tied in the VLA. transformers ties them
        # by the backbone's top-level flag: Qwen3-VL's text config may say otherwise (or nothing), and is not read.
        self.tie_word_embeddings = bool(getattr(self.vlm_config, "tie_word_embeddings", False))

    def validate_architecture(self):
        check_at_least(self, action_dim=1, action_horizon=1, state_dim=0)
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template: expected a text containing '{instruction}', got "
                             f"{self.prompt_template!r}")

    @property
    def variant(self) -> str:
        """The model_type without its `vla_` prefix (what `AutoModelForVLA.from_vlm(variant=...)` takes)."""
        return self.model_type.removeprefix("vla_")


__all__ = ["VLAConfig", "check_at_least"]


if __name__ == "__main__":
    from huggingface_hub.errors import StrictDataclassError

    config = VLAConfig(action_dim=7, action_horizon=8, state_dim=8)
    print(f"VLAConfig on a default {config.vlm_config.model_type} backbone: action {config.action_horizon} × "
          f"{config.action_dim}, state {config.state_dim}")
    reloaded = VLAConfig.from_dict(config.to_dict())
    print("round trip through to_dict / from_dict:", reloaded.to_dict() == config.to_dict())
    for bad in ({"action_horizon": 0}, {"prompt_template": "no placeholder"}):
        try:
            VLAConfig(**bad)
        except StrictDataclassError as error:  # the config's own ValueError, wrapped by the strict dataclass
            print(f"{bad} rejected: {error.__cause__}")
