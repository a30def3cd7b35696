"""At StarVLA's published configurations the OFT head has QwenOFT's modules and shapes (meta device, no weights).

Backbone configs are the published Qwen2.5-VL-3B-Instruct and Qwen3-VL-4B-Instruct `config.json` values
(`hf_vla.testing.published_vlm_config`).
StarVLA's QwenOFT head (starVLA/model/framework/VLM4A/QwenOFT.py → L1RegressionActionHead → MLPResNet) is built with
input_dim = hidden_dim_vlm, hidden_dim = 2 · hidden_dim_vlm, action_dim = 7, num_blocks = 2.
"""

import pytest
import torch
from transformers import AutoConfig

from hf_vla import AutoModelForVLA
from hf_vla.testing import published_vlm_config

QWEN2_5_VL_3B = published_vlm_config("qwen2_5_vl_3b")
QWEN3_VL_4B = published_vlm_config("qwen3_vl_4b")

# StarVLA's OFT head keys (starvla.md §10), below `action_model.model.`
STARVLA_OFT_HEAD_KEYS = {
    f"{module}.{p}"
    for module in ["layer_norm1", "fc1", "mlp_resnet_blocks.0.ffn.0", "mlp_resnet_blocks.0.ffn.1",
                   "mlp_resnet_blocks.1.ffn.0", "mlp_resnet_blocks.1.ffn.1", "layer_norm2", "fc2"]
    for p in ("weight", "bias")
}  # fmt: skip


def oft_head_parameter_counts(h: int, action_dim: int = 7) -> dict[str, int]:
    """Per-module parameter counts of StarVLA's MLPResNet head for VLM hidden size h (hidden width 2h)."""
    w = 2 * h
    return {
        "layer_norm1": 2 * h,  # LayerNorm(h): weight + bias
        "fc1": h * w + w,  # Linear(h → 2h)
        "mlp_resnet_blocks.0": (2 * w) + (w * w + w),  # LayerNorm(2h) + Linear(2h → 2h)
        "mlp_resnet_blocks.1": (2 * w) + (w * w + w),
        "layer_norm2": 2 * w,
        "fc2": w * action_dim + action_dim,  # Linear(2h → 7)
    }


@pytest.mark.parametrize(
    "vlm_config, hidden, expected_total",
    [
        # 4,096 + 8,392,704 + 2 · 16,789,504 + 8,192 + 28,679 = 42,012,679
        (QWEN2_5_VL_3B, 2048, 42_012_679),
        # 5,120 + 13,112,320 + 2 · 26,229,760 + 10,240 + 35,847 = 65,623,047
        (QWEN3_VL_4B, 2560, 65_623_047),
    ],
    ids=["qwen2.5-vl-3b", "qwen3-vl-4b"],
)
def test_oft_head_matches_starvla_at_published_config(vlm_config, hidden, expected_total):
    config = AutoConfig.for_model("vla_oft", vlm_config=vlm_config.to_dict(), action_dim=7, action_horizon=16)
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)

    head = model.action_head
    assert {k for k, _ in head.named_parameters()} == STARVLA_OFT_HEAD_KEYS
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in head.named_children() if name != "relu"}
    counts.update({f"mlp_resnet_blocks.{i}": sum(p.numel() for p in b.parameters()) for i, b in enumerate(head.mlp_resnet_blocks)})
    del counts["mlp_resnet_blocks"]
    assert counts == oft_head_parameter_counts(hidden)
    assert sum(counts.values()) == expected_total
    assert head.fc1.weight.shape == (2 * hidden, hidden) and head.fc2.weight.shape == (7, 2 * hidden)

    # The backbone is the family's own ForConditionalGeneration, tied like the published model, so StarVLA's
    # `qwen_vl_interface.model.*` keys map onto `vlm.*` one to one.
    assert model.config.tie_word_embeddings
    assert model.all_tied_weights_keys == {"vlm.lm_head.weight": "vlm.model.language_model.embed_tokens.weight"}
    keys = set(model.state_dict())
    assert {"vlm.lm_head.weight", "vlm.model.language_model.embed_tokens.weight"} <= keys
    assert any(k.startswith("vlm.model.visual.") for k in keys)
    assert model.vlm.model.language_model.embed_tokens.weight.shape == (151936, hidden)

    # the model card's parameter table counts the tied LM head once (model.parameters() yields it once)
    from hf_vla.hub.card import parameter_table

    table = dict(parameter_table(model))
    assert "vlm.lm_head" not in table and table["action_head.fc1"] == hidden * 2 * hidden + 2 * hidden
    assert sum(table.values()) == sum(p.numel() for p in model.parameters())
