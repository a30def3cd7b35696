"""Every variant's configuration refuses a bad value when it is built, naming the field, what it expects and what it
got (transformers' strict-dataclass errors, as its own configs raise), instead of a torch error later or a silent
default."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from hf_vla import AutoModelForVLA
from hf_vla.auto import VARIANTS
from hf_vla.testing import published_vlm_config

VLM = published_vlm_config("qwen2_5_vl_3b")  # 36 layers, width 2048
VARIANT_NAMES = [model_type.removeprefix("vla_") for model_type in VARIANTS]
FLOW = ["gr00t", "pi", "pi_v3"]

COMMON = [
    (dict(action_dim=0), r"action_dim: expected ≥ 1, got 0"),
    (dict(action_horizon=-2), r"action_horizon: expected ≥ 1, got -2"),
    (dict(state_dim=-1), r"state_dim: expected ≥ 0, got -1"),
    (dict(action_dim=7.0), r"Field 'action_dim' expected int, got float"),
    (dict(action_horizon=True), r"Field 'action_horizon' expected int, got bool"),
    (dict(state_in_prompt="false"), r"Field 'state_in_prompt' expected bool, got str"),
    (dict(prompt_template="go"), r"prompt_template: expected a text containing '\{instruction\}', got 'go'"),
]
FLOW_CASES = [
    (dict(attention_head_dim=0), r"attention_head_dim: expected ≥ 1, got 0"),
    (dict(num_inference_steps=0), r"num_inference_steps: expected ≥ 1, got 0"),
    (dict(repeated_diffusion_steps=0), r"repeated_diffusion_steps: expected ≥ 1, got 0"),
    (dict(num_dit_layers=0), r"num_dit_layers: expected ≥ 1, got 0"),
    (dict(head_hidden_size=0), r"head_hidden_size: expected ≥ 1, got 0"),
    (dict(max_seq_len=8), r"max_seq_len: expected ≥ 16, got 8"),
    (dict(dit_hidden_size=100), r"dit_hidden_size: expected a multiple of attention_head_dim 64, got 100"),
    (dict(dropout=1.0), r"dropout: expected a probability in \[0, 1\), got 1.0"),
    (dict(time_noise_s=0.0), r"time_noise_s: expected s in \(0, 1\], got 0.0"),
    (dict(time_beta_alpha=-1.0), r"time_beta_alpha: expected a Beta parameter > 0, got -1.0"),
    (dict(condition_mask="sometimes"), r"condition_mask: expected one of \('always', 'training', 'never'\), got 'sometimes'"),
    (dict(num_inference_steps=2.0), r"Field 'num_inference_steps' expected int, got float"),
]
VARIANT_CASES = {
    "oft": [
        (dict(head_num_blocks=-1), r"head_num_blocks: expected ≥ 0, got -1"),
        (dict(head_hidden_dim=0), r"head_hidden_dim: expected ≥ 1, got 0"),
        (dict(action_query_suffix=" predict {n}: {queries}"), r"action_query_suffix: expected a text with '\{queries\}'"),
    ],
    "fast": [(dict(num_action_tokens=0), r"num_action_tokens: expected ≥ 1, got 0"),
             (dict(max_action_tokens=0), r"max_action_tokens: expected ≥ 1, got 0")],
    "bins": [(dict(num_action_tokens=-3), r"num_action_tokens: expected ≥ 1, got -3"),
             (dict(num_action_tokens=1), r"num_action_tokens: expected ≥ 2, got 1")],
    **{variant: FLOW_CASES for variant in FLOW},
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_bad_values_are_refused_by_name(variant):
    AutoConfig.for_model(f"vla_{variant}", vlm_config=VLM)  # the defaults are valid
    for kwargs, message in COMMON + VARIANT_CASES[variant]:
        with pytest.raises(StrictDataclassError, match=message):
            AutoConfig.for_model(f"vla_{variant}", vlm_config=VLM, **kwargs)


def test_integers_are_welcome_where_a_float_is_expected():
    config = AutoConfig.for_model("vla_gr00t", vlm_config=VLM, dropout=0, time_beta_beta=2, initializer_range=1)
    assert (config.dropout, config.time_beta_beta, config.initializer_range) == (0, 2, 1)


@pytest.mark.parametrize("variant", ["pi", "pi_v3"])
def test_layerwise_heads_have_at_most_one_block_per_vlm_layer(variant):
    with torch.device("meta"):  # fewer blocks read the last VLM layers (checkpoints saved so must keep loading)
        model = AutoModelForVLA.from_config(AutoConfig.for_model(f"vla_{variant}", vlm_config=VLM, num_dit_layers=3))
        assert len(model.action_head.model.transformer_blocks) == 3
        config = AutoConfig.for_model(f"vla_{variant}", vlm_config=VLM, num_dit_layers=37)
        with pytest.raises(ValueError, match=r"num_dit_layers: .* at most one block per VLM layer \(36\), got 37"):
            AutoModelForVLA.from_config(config)


def test_from_vlm_refuses_a_misspelt_field(tiny_vlm_dirs):
    with pytest.raises(ValueError, match=r"VLAGR00TConfig: unknown field\(s\) \['action_horizn'\]; closest known: "
                                         r"action_horizn → action_horizon"):
        AutoModelForVLA.from_vlm(tiny_vlm_dirs["qwen2_5_vl"], variant="gr00t", action_horizn=8)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['zzz'\]; closest known: zzz → \(none close\)$"):
        AutoModelForVLA.from_vlm(tiny_vlm_dirs["qwen2_5_vl"], variant="gr00t", zzz=8)
    model = AutoModelForVLA.from_vlm(tiny_vlm_dirs["qwen2_5_vl"], variant="oft", attn_implementation="eager")
    assert model.vlm.config._attn_implementation == "eager"  # what every transformers config takes still passes
