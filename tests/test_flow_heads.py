"""Flow-matching action heads (GR00T / layer-wise DiT): published shapes, math, and training/sampling behaviour."""

import math

import pytest
import torch

from hf_vla.heads.dit import AdaLayerNorm, DiT, attention_mask_from_key_padding, timestep_sinusoidal_embedding
from hf_vla.heads.flow_matching import FlowMatchingActionHead, action_time_sinusoidal_embedding

# ---------------------------------------------------------------------------------------------------------------------
# Published configurations (StarVLA), built on the meta device

GR00T_QWEN25_3B = dict(
    action_dim=7, action_horizon=8, state_dim=7, dit_hidden_size=768, num_layers=16, attention_head_dim=64,
    cross_attention_dim=2048, output_dim=1024, mlp_hidden_size=1024, interleave_self_attention=True,
)  # fmt: skip
PI_QWEN25_3B = dict(
    action_dim=7, action_horizon=16, state_dim=7, dit_hidden_size=2048, num_layers=36, attention_head_dim=64,
    output_dim=26, mlp_hidden_size=1024, layerwise=True, interleave_self_attention=True,
)  # fmt: skip
PI_V3_QWEN3_4B = dict(
    action_dim=7, action_horizon=16, state_dim=7, dit_hidden_size=1024, num_layers=36, num_attention_heads=16,
    output_dim=26, mlp_hidden_size=1024, layerwise=True, project_condition_dim=2560, interleave_self_attention=False,
)  # fmt: skip


def block_parameter_count(D, kv_dim):
    """One DiT block: AdaLN linear D→2D, q (D→D), k/v (kv_dim→D), out (D→D), feed-forward D→4D→D; all with bias."""
    norm1 = D * 2 * D + 2 * D
    to_q = D * D + D
    to_k = kv_dim * D + D
    to_v = kv_dim * D + D
    to_out = D * D + D
    ff = (D * 4 * D + 4 * D) + (4 * D * D + D)
    return norm1 + to_q + to_k + to_v + to_out + ff


def expected_module_counts(D, num_layers, kv_dims, output_dim, decoder_in, state_dim=7, hidden=1024, action_dim=7):
    timestep_encoder = (256 * D + D) + (D * D + D)
    blocks = sum(block_parameter_count(D, kv) for kv in kv_dims)
    proj_out = (D * 2 * D + 2 * D) + (D * output_dim + output_dim)
    assert len(kv_dims) == num_layers
    return {
        "model": timestep_encoder + blocks + proj_out,
        "state_encoder": (state_dim * hidden + hidden) + (hidden * D + D),
        "action_encoder": (action_dim * D + D) + (2 * D * D + D) + (D * D + D),
        "action_decoder": (decoder_in * hidden + hidden) + (hidden * action_dim + action_dim),
        "future_tokens": 32 * D,
        "position_embedding": 1024 * D,
    }


BLOCK_MODULES = (
    "norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip


def expected_keys(num_layers, num_project_layers=0):
    keys = {f"model.timestep_encoder.timestep_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for i in range(num_layers):
        for name in BLOCK_MODULES:
            keys |= {f"model.transformer_blocks.{i}.{name}.weight", f"model.transformer_blocks.{i}.{name}.bias"}
    for name in ("model.proj_out_1", "model.proj_out_2", "state_encoder.layer1", "state_encoder.layer2",
                 "action_encoder.layer1", "action_encoder.layer2", "action_encoder.layer3",
                 "action_decoder.layer1", "action_decoder.layer2"):  # fmt: skip
        keys |= {f"{name}.weight", f"{name}.bias"}
    keys |= {"future_tokens.weight", "position_embedding.weight"}
    for i in range(num_project_layers):
        keys |= {f"project_layers.{i}.{j}.{p}" for j in (0, 1) for p in ("weight", "bias")}
    return keys


def module_counts(head):
    counts = {}
    for name, parameter in head.named_parameters():
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + parameter.numel()
    return counts


def test_gr00t_published_shapes():
    with torch.device("meta"):
        head = FlowMatchingActionHead(**GR00T_QWEN25_3B)
    state = head.state_dict()
    assert set(state) == expected_keys(16)
    assert all(p.is_meta for p in head.parameters())
    # Even blocks cross-attend to Qwen2.5-VL-3B's 2048-d last layer, odd blocks self-attend at 768.
    for i in range(16):
        kv = 2048 if i % 2 == 0 else 768
        assert state[f"model.transformer_blocks.{i}.attn1.to_k.weight"].shape == (768, kv)
        assert state[f"model.transformer_blocks.{i}.attn1.to_v.weight"].shape == (768, kv)
    assert state["model.proj_out_2.weight"].shape == (1024, 768)
    assert state["action_decoder.layer1.weight"].shape == (1024, 1024)
    assert state["action_decoder.layer2.weight"].shape == (7, 1024)
    assert state["state_encoder.layer1.weight"].shape == (1024, 7)
    assert state["state_encoder.layer2.weight"].shape == (768, 1024)
    assert state["future_tokens.weight"].shape == (32, 768)
    assert state["position_embedding.weight"].shape == (1024, 768)
    assert head.model.transformer_blocks[0].attn1.num_heads == 12

    expected = expected_module_counts(768, 16, [2048, 768] * 8, output_dim=1024, decoder_in=1024)
    assert module_counts(head) == expected
    assert sum(expected.values()) == 155_181_319


def test_pi_published_shapes():
    with torch.device("meta"):
        head = FlowMatchingActionHead(**PI_QWEN25_3B)
    state = head.state_dict()
    assert set(state) == expected_keys(36)
    # Cross dim == D, so interleaved and all-cross blocks have identical shapes.
    assert all(state[f"model.transformer_blocks.{i}.attn1.to_k.weight"].shape == (2048, 2048) for i in range(36))
    assert state["model.proj_out_2.weight"].shape == (26, 2048)
    assert state["action_decoder.layer1.weight"].shape == (1024, 2048)
    assert state["state_encoder.layer2.weight"].shape == (2048, 1024)
    assert head.model.transformer_blocks[0].attn1.num_heads == 2048 // 64

    expected = expected_module_counts(2048, 36, [2048] * 36, output_dim=26, decoder_in=2048)
    assert module_counts(head) == expected
    assert sum(expected.values()) == 2_146_887_713


def test_pi_v3_published_shapes():
    with torch.device("meta"):
        head = FlowMatchingActionHead(**PI_V3_QWEN3_4B)
    state = head.state_dict()
    assert set(state) == expected_keys(36, num_project_layers=36)
    assert state["project_layers.0.0.weight"].shape == (2560,)
    assert state["project_layers.35.1.weight"].shape == (1024, 2560)
    assert all(state[f"model.transformer_blocks.{i}.attn1.to_v.weight"].shape == (1024, 1024) for i in range(36))
    assert state["model.proj_out_2.weight"].shape == (26, 1024)
    assert state["action_decoder.layer1.weight"].shape == (1024, 1024)
    assert head.model.transformer_blocks[0].attn1.num_heads == 16

    expected = expected_module_counts(1024, 36, [1024] * 36, output_dim=26, decoder_in=1024)
    expected["project_layers"] = 36 * ((2560 + 2560) + (2560 * 1024 + 1024))
    assert module_counts(head) == expected
    assert sum(expected.values()) == 633_271_329


# ---------------------------------------------------------------------------------------------------------------------
# Tiny heads for behaviour tests

B, H, A, S, L, C = 2, 4, 3, 5, 6, 24  # batch, horizon, action dim, state dim, condition length, condition width
NUM_LAYERS = 4


def tiny_head(layerwise=False, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        action_dim=A, action_horizon=H, state_dim=S, dit_hidden_size=32, num_layers=NUM_LAYERS, attention_head_dim=16,
        cross_attention_dim=None if layerwise else C, output_dim=20, mlp_hidden_size=48, dropout=0.0,
        num_future_tokens=4, max_seq_len=16, layerwise=layerwise,
    )  # fmt: skip
    kwargs.update(overrides)
    return FlowMatchingActionHead(**kwargs)


def tiny_inputs(layerwise=False, width=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    width = width or (32 if layerwise else C)
    if layerwise:
        conditions = [torch.randn(B, L, width, generator=generator) for _ in range(NUM_LAYERS)]
    else:
        conditions = torch.randn(B, L, width, generator=generator)
    actions = torch.randn(B, H, A, generator=generator)
    state = torch.randn(B, S, generator=generator)
    noise = torch.randn(B, H, A, generator=generator)
    return conditions, actions, state, noise


@pytest.mark.parametrize("form", ["gr00t", "layerwise", "layerwise_projected"])
def test_loss_and_sample_shapes(form):
    layerwise = form != "gr00t"
    extra = dict(project_condition_dim=40) if form == "layerwise_projected" else {}
    head = tiny_head(layerwise=layerwise, **extra)
    conditions, actions, state, _ = tiny_inputs(layerwise, width=40 if extra else None)
    mask = torch.ones(B, L, dtype=torch.bool)
    for given_state in (state, None):
        loss = head(conditions, mask, actions, state=given_state)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()
        assert head.sample(conditions, mask, state=given_state).shape == (B, H, A)
        assert head.sample(conditions, None, state=given_state, num_steps=2).shape == (B, H, A)


def test_condition_form_and_state_errors():
    conditions, actions, state, _ = tiny_inputs(layerwise=True)
    with pytest.raises(ValueError, match="sequence of 4"):
        tiny_head(layerwise=True)(conditions[:3], None, actions)
    with pytest.raises(ValueError, match="one condition tensor"):
        tiny_head()(conditions, None, actions)
    with pytest.raises(ValueError, match="state"):
        tiny_head(state_dim=None)(tiny_inputs()[0], None, actions, state=state)
    with pytest.raises(ValueError, match="layerwise"):
        tiny_head(project_condition_dim=40)


@pytest.mark.parametrize("layerwise", [False, True])
def test_overfits_fixed_batch(layerwise):
    head = tiny_head(layerwise=layerwise)
    conditions, actions, state, noise = tiny_inputs(layerwise)
    time = torch.tensor([0.2, 0.7])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    initial = head(conditions, None, actions, state=state, noise=noise, time=time).item()
    for _ in range(300):
        loss = head(conditions, None, actions, state=state, noise=noise, time=time)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < initial / 5:
            break
    assert loss.item() < initial / 5, (initial, loss.item())


def test_sample_is_deterministic_given_noise():
    head = tiny_head(dropout=0.2).eval()
    conditions, _, state, noise = tiny_inputs()
    first = head.sample(conditions, None, state=state, noise=noise)
    torch.manual_seed(123)  # global RNG state must not matter once noise is given
    second = head.sample(conditions, None, state=state, noise=noise)
    assert torch.equal(first, second)
    assert not torch.allclose(first, head.sample(conditions, None, state=state, noise=noise + 1))


@pytest.mark.parametrize("layerwise", [False, True])
def test_sample_runs_dit_once_per_step(layerwise):
    head = tiny_head(layerwise=layerwise).eval()
    conditions, _, state, _ = tiny_inputs(layerwise)
    calls = []
    head.model.register_forward_hook(lambda module, args, output: calls.append(args[1].tolist()))
    for steps in (1, 3):
        calls.clear()
        head.sample(conditions, None, state=state, num_steps=steps)
        assert len(calls) == steps
    calls.clear()
    head.sample(conditions, None, state=state)
    assert calls == [[0, 0], [250, 250], [500, 500], [750, 750]]  # default N = 4, t = k/N, bucket = floor(1000 t)


def test_one_euler_step_matches_velocity():
    head = tiny_head().eval()
    conditions, _, state, noise = tiny_inputs()
    buckets = torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        prepared, state_tokens = head.prepare_conditions(conditions), head.encode_state(state, B)
        velocity = head.predict_velocity(noise, buckets, prepared, None, state_tokens)
    torch.testing.assert_close(head.sample(conditions, None, state=state, noise=noise, num_steps=1), noise + velocity)


def test_timestep_features_match_reference():
    def reference(t, channels=256):  # diffusers Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        half = channels // 2
        angles = [t * math.exp(-math.log(10000) * k / (half - 1)) for k in range(half)]
        return [math.cos(a) for a in angles] + [math.sin(a) for a in angles]

    features = timestep_sinusoidal_embedding(torch.tensor([0, 1, 500]))
    assert features.shape == (3, 256)
    for row, t in zip(features, (0, 1, 500)):
        torch.testing.assert_close(row, torch.tensor(reference(t)), atol=1e-4, rtol=0)  # float32 angles up to 500
    # Spot values: first channel uses frequency 1, the last of each half frequency 1e-4.
    assert features[1, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert features[1, 127].item() == pytest.approx(math.cos(1e-4), abs=1e-6)
    assert features[1, 128].item() == pytest.approx(math.sin(1.0), abs=1e-6)

    # Action-encoder time features: sin half then cos half, f_k = 1e4^(-k / (D/2)); D = 8 → f = 1, .1, .01, .001.
    action_features = action_time_sinusoidal_embedding(torch.tensor([3, 250]), 8)
    for row, t in zip(action_features, (3, 250)):
        expected = [math.sin(t * f) for f in (1, 0.1, 0.01, 0.001)] + [math.cos(t * f) for f in (1, 0.1, 0.01, 0.001)]
        torch.testing.assert_close(row, torch.tensor(expected), atol=1e-5, rtol=1e-5)

    head = tiny_head()
    assert head.time_to_bucket(torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1.0])).tolist() == [0, 249, 250, 999, 1000]


def test_time_sampling_distribution():
    torch.manual_seed(0)
    t = tiny_head().sample_time(20000)
    assert t.min() >= 0 and t.max() <= 1
    # u ~ Beta(1.5, 1): E[u] = 0.6, so E[t] = (0.999 - 0.6) / 0.999.
    assert t.mean().item() == pytest.approx((0.999 - 0.6) / 0.999, abs=0.01)


def test_key_padding_mask_hides_padding_and_a_sample_without_real_tokens_attends_to_all():
    mask = torch.tensor([[False, True, True], [False, False, False], [True, True, True]])
    additive = attention_mask_from_key_padding(mask)
    inf = float("-inf")
    expected = torch.tensor([[inf, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])[:, None, None, :]
    assert additive.shape == (3, 1, 1, 3) and torch.equal(additive, expected)

    torch.manual_seed(0)
    dit = DiT(num_attention_heads=2, attention_head_dim=8, num_layers=2, output_dim=5, cross_attention_dim=6).eval()
    tokens, condition = torch.randn(3, 4, 16), torch.randn(3, 3, 6)
    with torch.no_grad():
        masked = dit(tokens, torch.tensor([1, 2, 3]), condition, mask)
        unmasked = dit(tokens, torch.tensor([1, 2, 3]), condition)
        dropped = dit(tokens[:1, :], torch.tensor([1]), condition[:1, 1:])  # sample 0 without its padded token
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked[1:], unmasked[1:])
    torch.testing.assert_close(masked[:1], dropped)


def test_adaptive_norm_chunk_order():
    """Block AdaLN splits its linear output as [scale, shift]; the DiT output layer as [shift, scale]."""
    norm = AdaLayerNorm(4)
    x = torch.randn(1, 3, 4)
    with torch.no_grad():
        norm.linear.weight.zero_()
        norm.linear.bias.copy_(torch.tensor([1.0] * 4 + [0.5] * 4))  # scale = 1, shift = 0.5
    torch.testing.assert_close(norm(x, torch.zeros(1, 4)), torch.nn.functional.layer_norm(x, (4,)) * 2 + 0.5)

    dit = DiT(num_attention_heads=1, attention_head_dim=4, num_layers=0, output_dim=4)
    with torch.no_grad():
        dit.proj_out_1.weight.zero_()
        dit.proj_out_1.bias.copy_(torch.tensor([0.5] * 4 + [1.0] * 4))  # shift = 0.5, scale = 1
        dit.proj_out_2.weight.copy_(torch.eye(4))
        dit.proj_out_2.bias.zero_()
    expected = torch.nn.functional.layer_norm(x, (4,), eps=1e-6) * 2 + 0.5
    torch.testing.assert_close(dit(x, torch.tensor([3]), torch.randn(1, 2, 4)), expected)


def test_action_mask_excludes_masked_steps():
    head = tiny_head()
    conditions, actions, state, noise = tiny_inputs()
    time = torch.full((B,), 0.5)
    action_mask = torch.ones(B, H, dtype=torch.bool)
    action_mask[0, 2:] = False
    action_mask[1, 3:] = False
    # Move action and noise of the masked steps so that x_t = (a + n) / 2 stays identical: the DiT input is unchanged
    # but the target velocity a - n at those steps becomes large.
    shift = 10.0 * (~action_mask)[..., None].float()
    masked = head(conditions, None, actions, state=state, action_mask=action_mask, noise=noise, time=time)
    moved = head(
        conditions, None, actions + shift, state=state, action_mask=action_mask, noise=noise - shift, time=time
    )
    torch.testing.assert_close(masked, moved)
    unmasked = head(conditions, None, actions + shift, state=state, noise=noise - shift, time=time)
    assert unmasked > 10 * masked
    # the mean over valid entries: the valid steps' loss and the masked steps' loss, weighted by their counts, make up
    # the unmasked loss
    valid = action_mask.sum()
    inverse = head(conditions, None, actions, state=state, action_mask=~action_mask, noise=noise, time=time)
    full = head(conditions, None, actions, state=state, noise=noise, time=time)
    torch.testing.assert_close(full, (masked * valid + inverse * (action_mask.numel() - valid)) / action_mask.numel())

    full_mask = torch.ones(B, H)
    torch.testing.assert_close(
        head(conditions, None, actions, state=state, action_mask=full_mask, noise=noise, time=time),
        head(conditions, None, actions, state=state, noise=noise, time=time),
    )


def test_bf16_head_builds_the_path_at_the_time_its_bucket_names(monkeypatch):
    """A bf16 head rounds only the DiT's input: x_t and the target come from the float32 time and chunk, so the
    bucket the DiT is told is the time x_t was built at (a bf16 time lands up to 4 buckets away near t = 1)."""
    head = tiny_head().to(torch.bfloat16)
    conditions, actions, state, noise = tiny_inputs()
    time = torch.tensor([0.9931, 0.4567])
    seen = {}

    def record(noisy_actions, buckets, *args):
        seen.update(noisy_actions=noisy_actions, buckets=buckets)
        return torch.zeros_like(noisy_actions)

    monkeypatch.setattr(head, "predict_velocity", record)
    loss = head(conditions.to(torch.bfloat16), None, actions, state=state.to(torch.bfloat16), noise=noise, time=time)
    t = time[:, None, None]
    assert seen["noisy_actions"].dtype == torch.bfloat16 and seen["buckets"].tolist() == [993, 456]
    expected = ((1 - t) * noise + t * actions).to(torch.bfloat16)
    torch.testing.assert_close(seen["noisy_actions"], expected, rtol=0, atol=0)
    torch.testing.assert_close(loss, (actions - noise).pow(2).mean())  # a zero velocity: the float32 target's size


def test_bf16_head_integrates_the_sampling_path_in_float32(monkeypatch):
    """Sampling, like training, rounds only the DiT's input: the Euler path x += v̂/N stays float32. In bf16 the
    steps of a slow velocity (0.01 / 4 per step near x = 2, where bf16 values lie 1/64 apart) would all be lost."""
    head = tiny_head().to(torch.bfloat16).eval()
    conditions, _, state, _ = tiny_inputs()
    noise = torch.full((B, H, A), 2.0) + torch.linspace(0, 1e-3, B * H * A).view(B, H, A)  # not bf16-representable
    seen = []

    def slow(noisy_actions, *args):
        seen.append(noisy_actions.dtype)
        return torch.full_like(noisy_actions, 0.01)

    monkeypatch.setattr(head, "predict_velocity", slow)
    chunk = head.sample(conditions.to(torch.bfloat16), None, state=state.to(torch.bfloat16), noise=noise, num_steps=4)
    assert chunk.dtype == torch.float32
    torch.testing.assert_close(chunk, noise + 4 * (0.01 / 4), rtol=0, atol=1e-6)


def test_bf16_sampling_stays_close_to_float32():
    """Measured: a bf16 head (weights std 0.1; the chunk moves 0.11 on average) samples within 1.1e-3 of float32 in
    10 steps; with the path in bf16 it was 1.3e-2 away."""
    head = tiny_head().eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.1)  # a head whose velocity moves the chunk (an initialised one barely does)
    conditions, _, state, noise = tiny_inputs()
    full = head.sample(conditions, None, state=state, noise=noise, num_steps=10)
    assert (full - noise).abs().mean() > 0.05
    low = head.to(torch.bfloat16).sample(conditions.to(torch.bfloat16), None, state=state.to(torch.bfloat16),
                                         noise=noise, num_steps=10)  # fmt: skip
    torch.testing.assert_close(low.float(), full, rtol=0, atol=4e-3)


def test_condition_mask_hides_padding():
    head = tiny_head().eval()
    conditions, _, state, noise = tiny_inputs()
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :2] = False  # left padding of sample 0
    changed = conditions.clone()
    changed[0, :2] = 100.0
    torch.testing.assert_close(
        head.sample(conditions, mask, state=state, noise=noise), head.sample(changed, mask, state=state, noise=noise)
    )
    assert not torch.allclose(head.sample(conditions, None, noise=noise), head.sample(changed, None, noise=noise))


@pytest.mark.parametrize("layerwise", [False, True])
def test_interleaved_and_all_cross_share_shapes_not_outputs(layerwise):
    extra = {} if layerwise else dict(cross_attention_dim=None)  # GR00T form: equal shapes need cross dim == D
    interleaved = tiny_head(layerwise=layerwise, interleave_self_attention=True, **extra).eval()
    all_cross = tiny_head(layerwise=layerwise, interleave_self_attention=False, **extra).eval()
    shapes = {name: tensor.shape for name, tensor in interleaved.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in all_cross.state_dict().items()}
    all_cross.load_state_dict(interleaved.state_dict())

    conditions, _, state, noise = tiny_inputs(layerwise, width=32)
    out_interleaved = interleaved.sample(conditions, None, state=state, noise=noise)
    assert not torch.allclose(out_interleaved, all_cross.sample(conditions, None, state=state, noise=noise))

    if layerwise:  # interleaved: odd blocks self-attend, so odd-layer conditions are never read
        perturbed = list(conditions)
        perturbed[1] = perturbed[1] + 1.0
        torch.testing.assert_close(out_interleaved, interleaved.sample(perturbed, None, state=state, noise=noise))
        assert not torch.allclose(
            all_cross.sample(conditions, None, state=state, noise=noise),
            all_cross.sample(perturbed, None, state=state, noise=noise),
        )


@pytest.mark.parametrize("projected", [False, True])
def test_layerwise_block_i_reads_condition_i(projected):
    extra = dict(project_condition_dim=40) if projected else {}
    head = tiny_head(layerwise=True, interleave_self_attention=False, **extra).eval()
    conditions, _, state, noise = tiny_inputs(layerwise=True, width=40 if projected else None)
    seen = {}
    for index, block in enumerate(head.model.transformer_blocks):
        block.attn1.to_k.register_forward_pre_hook(lambda module, args, index=index: seen.setdefault(index, args[0]))
    head.sample(conditions, None, state=state, noise=noise, num_steps=1)
    with torch.no_grad():
        expected = [head.project_layers[i](c) for i, c in enumerate(conditions)] if projected else conditions
    for index in range(NUM_LAYERS):
        torch.testing.assert_close(seen[index], expected[index])


def test_repeated_diffusion_steps_multiply_batch():
    repeats = 3
    head = tiny_head(repeated_diffusion_steps=repeats)
    conditions, actions, state, _ = tiny_inputs()
    batch_sizes = []
    head.model.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    head(conditions, None, actions, state=state)
    assert batch_sizes == [B * repeats]

    noise = torch.randn(B * repeats, H, A)
    time = torch.rand(B * repeats)
    loss = head(conditions, None, actions, state=state, noise=noise, time=time)
    single = tiny_head(repeated_diffusion_steps=1)
    single.load_state_dict(head.state_dict())
    tiled = (conditions.repeat(repeats, 1, 1), actions.repeat(repeats, 1, 1), state.repeat(repeats, 1))
    torch.testing.assert_close(loss, single(tiled[0], None, tiled[1], state=tiled[2], noise=noise, time=time))
    with pytest.raises(ValueError, match="repeated_diffusion_steps"):
        head(conditions, None, actions, noise=noise[:B], time=time[:B])


def test_sampling_with_projected_contexts_equals_recomputing_them():
    """`sample` projects the conditions' keys/values once; stepping with the raw conditions gives the same chunk."""
    torch.manual_seed(0)
    for layerwise in (False, True):
        head = FlowMatchingActionHead(
            action_dim=3, action_horizon=4, state_dim=None, dit_hidden_size=32, num_layers=4, attention_head_dim=16,
            cross_attention_dim=None if layerwise else 24, output_dim=16, mlp_hidden_size=32, layerwise=layerwise,
            project_condition_dim=24 if layerwise else None, dropout=0.0,
        ).eval()  # fmt: skip
        conditions = [torch.randn(2, 5, 24) for _ in range(4)] if layerwise else torch.randn(2, 5, 24)
        mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
        noise = torch.randn(2, 4, 3)
        actions, prepared = noise.clone(), head.prepare_conditions(conditions)
        for k in range(3):
            buckets = torch.full((2,), int(k / 3 * 1000), dtype=torch.long)
            actions = actions + head.predict_velocity(actions, buckets, prepared, mask) / 3
        torch.testing.assert_close(head.sample(conditions, mask, noise=noise, num_steps=3), actions, rtol=0, atol=1e-6)


def test_all_cross_sampling_runs_the_action_tokens_alone_and_gives_the_same_chunk():
    """With no self-attention block the tokens never mix: `sample` leaves the state and future tokens out of every step
    and its chunk equals Euler steps over the full token sequence. With self-attention it keeps them all."""
    torch.manual_seed(0)
    head = tiny_head(layerwise=True, interleave_self_attention=False).eval()
    conditions, _, state, noise = tiny_inputs(layerwise=True)
    assert not head.tokens_interact and tiny_head(layerwise=True).tokens_interact
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        prepared, state_tokens, actions = head.prepare_conditions(conditions), head.encode_state(state, B), noise.clone()
        for k in range(3):
            buckets = torch.full((B,), int(k / 3 * 1000), dtype=torch.long)
            actions = actions + head.predict_velocity(actions, buckets, prepared, mask, state_tokens) / 3
    token_counts = []
    head.model.register_forward_hook(lambda module, args, output: token_counts.append(args[0].shape[1]))
    torch.testing.assert_close(head.sample(conditions, mask, state=state, noise=noise, num_steps=3), actions)
    assert token_counts == [H] * 3

    interleaved = tiny_head(layerwise=True).eval()
    interleaved.model.register_forward_hook(lambda module, args, output: token_counts.append(args[0].shape[1]))
    interleaved.sample(conditions, mask, state=state, noise=noise, num_steps=1)
    assert token_counts[-1] == 1 + 4 + H  # state, future and action tokens
    with pytest.raises(ValueError, match="action_tokens_only"):
        interleaved.predict_velocity(noise, torch.zeros(B, dtype=torch.long), conditions, action_tokens_only=True)


@pytest.mark.parametrize("layerwise", [False, True])
def test_sampling_computes_the_timestep_path_once_for_all_steps(layerwise):
    """Time features and AdaLN modulations depend only on the (known) timesteps: `sample` computes them for every
    step in one batch, and they equal what a step would compute for its own timestep."""
    head = tiny_head(layerwise=layerwise).eval()
    conditions, _, state, _ = tiny_inputs(layerwise)
    encoder_calls = []
    head.model.timestep_encoder.register_forward_hook(lambda module, args, output: encoder_calls.append(args[0].tolist()))
    head.sample(conditions, None, state=state, num_steps=5)
    assert encoder_calls == [[0, 200, 400, 600, 800]]
    with torch.no_grad():
        for bucket, (time_features, modulations) in head.sampling_schedule(5):
            own_features, own_modulations = head.timestep_features(bucket)
            torch.testing.assert_close(time_features, own_features, rtol=0, atol=0)
            assert len(modulations) == len(own_modulations) == head.num_layers + 1
            for batched, own in zip(modulations, own_modulations):
                torch.testing.assert_close(batched, own, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True])
def test_sampling_projects_the_conditions_keys_and_values_once_for_all_steps(layerwise):
    """The conditions are fixed while denoising: each cross-attention block's key/value projections of them run once
    per `sample`, whatever the number of steps (not once per step)."""
    head = tiny_head(layerwise=layerwise).eval()
    conditions, _, state, noise = tiny_inputs(layerwise)
    cross = [i for i in range(head.num_layers) if head.model.block_cross_attends(i)]
    calls = []
    for index in cross:
        block = head.model.transformer_blocks[index]
        for name in ("to_k", "to_v"):
            getattr(block.attn1, name).register_forward_hook(lambda *_, i=index, n=name: calls.append((i, n)))
    for steps in (1, 5):
        calls.clear()
        head.sample(conditions, None, state=state, noise=noise, num_steps=steps)
        assert sorted(calls) == sorted((i, n) for i in cross for n in ("to_k", "to_v")), steps
