"""oneDNN linear layers with packed weights: same results as nn.Linear within float32 rounding, same parameters and
checkpoints, repacked when the weights change, and left alone for training, other dtypes and small layers."""

import copy
import pickle

import numpy as np
import pytest
import torch
from test_flow_variants import batch_for, make_flow
from torch import nn

from hf_vla import AutoModelForVLA, VLAPolicy, packed_linear
from hf_vla.heads.dit import GELUProjection
from hf_vla.packed_linear import PackedLinear, pack_linear_weights, unpack_linear_weights

pytestmark = pytest.mark.skipif(not packed_linear.onednn_available(), reason="torch built without oneDNN")


def packed_copy(layer: nn.Linear) -> nn.Linear:
    packed = copy.deepcopy(layer)
    assert pack_linear_weights(packed, min_weight_numel=0) == 1
    return packed


@pytest.mark.parametrize("shape", [(16, 96), (2, 7, 96), (0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_matches_nn_linear_and_uses_the_packed_weight(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 80, bias=bias)
    packed = packed_copy(layer)
    x = torch.randn(shape)
    with torch.no_grad():
        out = packed(x)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    assert out.shape == (*shape[:-1], 80) and out.is_contiguous()
    assert packed._packed is not None and packed._packed[1].is_mkldnn


def test_feed_forward_gelu_is_fused_into_the_packed_kernel(monkeypatch):
    torch.manual_seed(0)
    feed_forward = GELUProjection(64, 256)
    packed = copy.deepcopy(feed_forward)
    pack_linear_weights(packed, min_weight_numel=0)
    x = torch.randn(2, 9, 64) * 3
    assert torch.equal(packed(x), feed_forward(x))  # autograd: unfused, bit for bit
    calls = []
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda *a, **k: calls.append(a) or torch.zeros(()))
    with torch.no_grad():
        out = packed(x)
    assert calls == []  # no separate GELU pass
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(out, feed_forward(x), rtol=1e-5, atol=1e-5)


def test_training_calls_run_nn_linear_and_get_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    packed = packed_copy(layer)
    x = torch.randn(5, 32)
    assert torch.equal(packed(x), layer(x))  # autograd: nn.Linear's own kernel, bit for bit
    packed(x).square().sum().backward()
    layer(x).square().sum().backward()
    assert torch.equal(packed.weight.grad, layer.weight.grad) and packed._packed is None


def test_packed_weight_follows_weight_changes():
    torch.manual_seed(0)
    packed, other = packed_copy(nn.Linear(32, 24)), nn.Linear(32, 24)
    x = torch.randn(4, 32)
    with torch.no_grad():
        packed(x)
        packed.load_state_dict(other.state_dict())  # in place: the version counter moves
        torch.testing.assert_close(packed(x), other(x), rtol=1e-5, atol=1e-5)
        packed.weight.mul_(2)
        doubled = nn.functional.linear(x, 2 * other.weight, other.bias)
        torch.testing.assert_close(packed(x), doubled, rtol=1e-5, atol=1e-5)
        packed.weight = nn.Parameter(torch.zeros(24, 32))  # a new tensor
        torch.testing.assert_close(packed(x), other.bias.expand(4, -1), rtol=0, atol=0)
        packed.weight.data.copy_(other.weight)  # invisible to autograd's version counter: packing again refreshes
        assert pack_linear_weights(packed) == 0 and packed._packed is None
        torch.testing.assert_close(packed(x), other(x), rtol=1e-5, atol=1e-5)


def test_layers_made_under_inference_mode_are_packed_too():
    with torch.inference_mode():
        torch.manual_seed(0)
        layer = nn.Linear(64, 48)
        packed = packed_copy(layer)
        x = torch.randn(3, 64)
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
        assert packed._packed is not None


def test_other_dtypes_run_nn_linear_and_casting_drops_the_packed_weight():
    layer = nn.Linear(32, 24)
    packed = packed_copy(layer)
    with torch.no_grad():
        packed(torch.randn(3, 32))
        assert packed._packed is not None
        layer, packed = layer.to(torch.bfloat16), packed.to(torch.bfloat16)
        assert packed._packed is None
        x = torch.randn(3, 32, dtype=torch.bfloat16)
        assert torch.equal(packed(x), layer(x))
    assert packed._packed is None


def test_only_large_layers_are_converted_and_checkpoints_are_unchanged():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_linear_weights(model) == 1  # 512×512 ≥ the default threshold, 8×512 is not
    assert [type(m) for m in model] == [PackedLinear, nn.ReLU, nn.Linear]
    with torch.no_grad():
        model(torch.randn(2, 512))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    clone = copy.deepcopy(model)  # the opaque packed weight is dropped, not copied
    assert type(clone[0]) is PackedLinear and clone[0]._packed is None
    pickle.loads(pickle.dumps(model))
    assert unpack_linear_weights(model) == 1 and type(model[0]) is nn.Linear and "_packed" not in vars(model[0])


def test_flow_variant_predicts_the_same_chunk_packed_and_saves_plain_weights(tiny_vlm_dirs, tmp_path):
    model, processor = make_flow(tiny_vlm_dirs["qwen2_5_vl"], "pi_v3")
    inputs = batch_for(processor)
    noise = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    expected = model.predict_action(**inputs, noise=noise)
    converted = pack_linear_weights(model, min_weight_numel=0)
    assert converted == sum(type(m) is PackedLinear for m in model.modules()) > 20
    torch.testing.assert_close(model.predict_action(**inputs, noise=noise), expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForVLA.from_pretrained(tmp_path)
    assert all(type(m) is not PackedLinear for m in loaded.modules())
    assert torch.equal(loaded.predict_action(**inputs, noise=noise), expected)


def test_policy_option_packs_the_model(tiny_vlm_dirs, monkeypatch):
    model, processor = make_flow(tiny_vlm_dirs["qwen3_vl"], "gr00t")
    rng = np.random.default_rng(0)
    obs = {"images": {"primary": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8),
                      "wrist": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)},
           "instruction": "open the drawer", "state": rng.normal(size=6)}  # fmt: skip
    torch.manual_seed(1)
    expected = VLAPolicy(model, processor).predict(obs)
    monkeypatch.setattr(packed_linear, "DEFAULT_MIN_WEIGHT_NUMEL", 0)
    policy = VLAPolicy(model, processor, pack_linear_weights=True)
    assert any(type(m) is PackedLinear for m in policy.model.modules())
    torch.manual_seed(1)
    np.testing.assert_allclose(policy.predict(obs), expected, rtol=1e-4, atol=1e-4)
