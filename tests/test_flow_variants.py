"""GR00T, PI and PI_v3 as transformers models on both backbones, and at StarVLA's published configurations."""

import copy
import re

import numpy as np
import pytest
import torch
from conftest import FAMILIES, random_views
from test_published_configs import QWEN2_5_VL_3B, QWEN3_VL_4B
from transformers import AutoConfig, AutoModel

from hf_vla import AutoModelForVLA, VLAPolicy, VLAProcessor
from hf_vla.testing import TINY_HEADS, train_steps

VARIANTS = ["gr00t", "pi", "pi_v3"]


def make_flow(vlm_dir, variant, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(action_dim=7, action_horizon=4, state_dim=6, dropout=0.0, **TINY_HEADS[variant])
    kwargs.update(overrides)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, **kwargs)
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    rng = np.random.default_rng(seed)
    processor.compute_norm_stats("bridge", rng.normal(size=(256, 7)), rng.normal(size=(256, 6)))
    return model, processor


@pytest.fixture(scope="module", params=[(f, v) for f in FAMILIES for v in VARIANTS], ids=lambda p: f"{p[0]}-{p[1]}")
def flow(request, tiny_vlm_dirs):
    family, variant = request.param
    return (family, variant, *make_flow(tiny_vlm_dirs[family], variant))


def batch_for(processor, seed=0, batch=2, actions=False):
    rng = np.random.default_rng(seed)
    kwargs = dict(images=random_views(rng, batch), text=["open the drawer", "close the door"][:batch],
                  state=rng.normal(size=(batch, 6)))  # fmt: skip
    if actions:
        kwargs["actions"] = rng.normal(size=(batch, 4, 7))
    return processor(**kwargs)


def test_save_load_exact_given_noise(flow, tmp_path):
    family, variant, model, processor = flow
    inputs = batch_for(processor, actions=True)
    noise = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    expected = model.predict_action(**inputs, noise=noise)
    repeats = model.config.repeated_diffusion_steps
    train_noise = torch.randn(repeats * 2, 4, 7)
    time = torch.rand(repeats * 2)
    expected_loss = model(**inputs, noise=train_noise, time=time).loss
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).model_type == f"vla_{variant}"
    for auto in (AutoModelForVLA, AutoModel):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is type(model)
        assert torch.equal(loaded.predict_action(**inputs, noise=noise), expected)
        assert torch.equal(loaded(**inputs, noise=train_noise, time=time).loss, expected_loss)
    assert not torch.equal(model.predict_action(**inputs), model.predict_action(**inputs))  # fresh noise each call


def with_moving_head(model, seed=0):
    """A copy whose head weights are drawn wide enough (std 0.1) that its velocity moves the chunk: an initialised
    head's barely does, and a chunk that stays at its noise compares equal at any precision."""
    moving = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in moving.action_head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return moving


def test_bf16_loading_and_casting_stay_close_to_float32(flow, tmp_path):
    """`from_pretrained(dtype=bf16)`: every parameter bf16, only the backbone's rotary frequencies float32 (as
    transformers builds them); the policy casts the processor's pixels. Measured max |Δ| to float32: 2e-3 to 7.7e-3
    loaded in bf16, up to 7.7e-3 cast with `.to(bf16)` (which also rounds the rotary frequencies), while the chunk
    moves 0.17 to 0.29 from its noise. Integrating in bf16 was up to 3.4e-2 away."""
    _, _, model, processor = flow
    model = with_moving_head(model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    views, state = np.stack(random_views(rng, 2)), rng.normal(size=(2, 6))
    observation = {"images": {"primary": views[:, 0], "wrist": views[:, 1]}, "instruction": ["open", "close the door"],
                   "state": state}  # fmt: skip
    noise = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    _, full = VLAPolicy(model, processor).predict(observation, return_normalized=True, noise=noise)
    assert np.abs(full - noise.numpy()).mean() > 0.1

    policy = VLAPolicy.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    tensors = dict(policy.model.named_parameters()) | dict(policy.model.named_buffers())
    float32 = sorted(name for name, tensor in tensors.items() if tensor.dtype != torch.bfloat16)
    assert float32 and all(name.endswith("inv_freq") for name in float32), float32
    _, low = policy.predict(observation, return_normalized=True, noise=noise)
    np.testing.assert_allclose(low, full, rtol=0, atol=1e-2)

    inputs = processor(images=list(map(list, views)), text=observation["instruction"], state=state)
    cast = AutoModelForVLA.from_pretrained(tmp_path).to(torch.bfloat16)
    chunk = cast.predict_action(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}, noise=noise)
    assert chunk.dtype == torch.float32
    np.testing.assert_allclose(chunk.numpy(), full, rtol=0, atol=1e-2)


def test_backbone_runs_once_per_predict_action(flow):
    _, _, model, processor = flow
    inputs = batch_for(processor)
    calls = {"vlm": 0, "dit": 0}
    hooks = [
        model.vlm.model.register_forward_hook(lambda *a: calls.__setitem__("vlm", calls["vlm"] + 1)),
        model.action_head.model.register_forward_hook(lambda *a: calls.__setitem__("dit", calls["dit"] + 1)),
    ]
    try:
        for steps in (1, 4, 10):
            calls.update(vlm=0, dit=0)
            model.predict_action(**inputs, num_steps=steps)
            assert calls == {"vlm": 1, "dit": steps}
    finally:
        for hook in hooks:
            hook.remove()


def test_step_counts_follow_the_config_as_edited(flow, monkeypatch):
    """`num_inference_steps` and `repeated_diffusion_steps` are read from the config at each call, as saving and
    reloading would apply them."""
    _, _, model, processor = flow
    inputs = batch_for(processor, actions=True)
    monkeypatch.setattr(model.config, "num_inference_steps", 3)
    monkeypatch.setattr(model.config, "repeated_diffusion_steps", 3)
    calls = []
    hook = model.action_head.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    try:
        model.predict_action(**inputs)
        assert calls == [2] * 3
        calls.clear()
        model(**inputs)
        assert calls == [3 * 2]  # every sample three times, each with its own noise and time
        with pytest.raises(ValueError, match=r"noise must be \(6, 4, 7\)"):
            model(**inputs, noise=torch.randn(2 * 2, 4, 7), time=torch.rand(2 * 2))
    finally:
        hook.remove()


def test_predictions_depend_on_image_instruction_and_state(flow):
    _, variant, model, processor = flow
    rng = np.random.default_rng(1)
    views, other = random_views(rng, 1), random_views(rng, 1)
    state = np.zeros((1, 6))
    noise = torch.randn(1, 4, 7)

    def predict(images, text, state):
        return model.predict_action(**processor(images=images, text=text, state=state), noise=noise)

    base = predict(views, ["open the drawer"], state)
    assert (base - predict(other, ["open the drawer"], state)).abs().max() > 1e-6
    assert (base - predict(views, ["close the door"], state)).abs().max() > 1e-6
    assert (base - predict(views, ["open the drawer"], np.ones((1, 6)))).abs().max() > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_overfitting_a_batch(tiny_vlm_dirs, family, variant):
    model, processor = make_flow(tiny_vlm_dirs[family], variant, seed=2, repeated_diffusion_steps=2)
    inputs = batch_for(processor, seed=3, actions=True)
    generator = torch.Generator().manual_seed(0)
    noise, time = torch.randn(4, 4, 7, generator=generator), torch.rand(4, generator=generator)
    losses = train_steps(model, {**inputs, "noise": noise, "time": time}, steps=150, lr=3e-3)
    assert losses[-1] < losses[0] / 10, (variant, losses[0], losses[-1])


def test_bad_inputs(tiny_vlm_dirs):
    model, processor = make_flow(tiny_vlm_dirs["qwen2_5_vl"], "gr00t")
    inputs = batch_for(processor)
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 4, 7\] .*, got \[2, 4, 5\]"):
        model(**inputs, actions=torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 4, 7\] .*, got \[3, 4, 7\]"):
        model(**inputs, actions=torch.zeros(3, 4, 7))
    state = inputs.pop("state")
    for bad in (state[:, :-1], state[:1], state[0]):
        with pytest.raises(ValueError, match=rf"state: expected shape \[2, {state.shape[1]}\] or .*, got {re.escape(str(list(bad.shape)))}"):
            model.predict_action(**inputs, state=bad)
    with pytest.raises(ValueError, match="num_steps: expected a positive integer, got 0"):
        model.predict_action(**inputs, state=state, num_steps=0)
    inputs["state"] = state
    with pytest.raises(ValueError, match="actions: flow-matching training needs target actions"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"noise must be \(2, 4, 7\), got \(2, 4, 6\)"):
        model.predict_action(**inputs, noise=torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="dit_hidden_size: the PI head runs at the VLM width 64, got 32"):
        make_flow(tiny_vlm_dirs["qwen2_5_vl"], "pi", dit_hidden_size=32)


def test_gr00t_sizes_left_to_none_follow_the_vlm(tiny_vlm_dirs):
    model, _ = make_flow(tiny_vlm_dirs["qwen2_5_vl"], "gr00t", dit_hidden_size=None, num_dit_layers=None)
    assert model.action_head.future_tokens.embedding_dim == 64  # the tiny backbone: 64 wide, 2 layers
    assert len(model.action_head.model.transformer_blocks) == 2


def test_pi_v3_writes_state_into_the_prompt_and_pi_does_not(tiny_vlm_dirs):
    for variant, in_prompt in (("pi_v3", True), ("pi", False), ("gr00t", False)):
        _, processor = make_flow(tiny_vlm_dirs["qwen2_5_vl"], variant)
        text = processor.tokenizer.decode(batch_for(processor)["input_ids"][0])
        assert ("[STATE]" in text and "[ACTION]" in text) == in_prompt, variant


def test_pi_v3_head_does_not_encode_the_state_tensor_too(tiny_vlm_dirs):
    """PI_v3 reads the state from its prompt only: its (frozen, checkpoint-compatible) state encoder never runs, so a
    changed state tensor beside the same prompt changes nothing; GR00T's head does encode it."""
    for variant, encoded in (("pi_v3", False), ("gr00t", True)):
        model, processor = make_flow(tiny_vlm_dirs["qwen2_5_vl"], variant)
        inputs = batch_for(processor, actions=True)
        noise, state = torch.randn(2, 4, 7), inputs["state"]
        calls = []
        model.action_head.state_encoder.register_forward_hook(lambda *_: calls.append(1))
        first = model.predict_action(**{**inputs, "state": state}, noise=noise)
        second = model.predict_action(**{**inputs, "state": state + 1}, noise=noise)
        assert bool(calls) == encoded and torch.equal(first, second) != encoded, variant


def test_attention_modes_share_shapes_but_not_outputs(tiny_vlm_dirs):
    interleaved, processor = make_flow(tiny_vlm_dirs["qwen2_5_vl"], "pi_v3", interleave_self_attention=True)
    all_cross, _ = make_flow(tiny_vlm_dirs["qwen2_5_vl"], "pi_v3", interleave_self_attention=False)
    all_cross.load_state_dict(interleaved.state_dict())
    inputs, noise = batch_for(processor), torch.randn(2, 4, 7)
    assert not torch.allclose(interleaved.predict_action(**inputs, noise=noise), all_cross.predict_action(**inputs, noise=noise))


def dit_block_params(d, kv_dim):
    """One DiT block: AdaLN linear (temb D → 2D), q/out (D×D), k/v (kv_dim → D), feed-forward D → 4D → D."""
    return (d * 2 * d + 2 * d) + 2 * (d * d + d) + 2 * (kv_dim * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)


def flow_head_params(d, blocks, kv_dims, output_dim, vlm_hidden=None, action_dim=7, state_dim=7, mlp=1024):
    dit = (256 * d + d) + (d * d + d) + sum(dit_block_params(d, kv) for kv in kv_dims) + (d * 2 * d + 2 * d) + (d * output_dim + output_dim)
    decoder_in = output_dim if vlm_hidden is None else d
    counts = {
        "model": dit,  # timestep MLP 256 → D → D, blocks, proj_out_1 (D → 2D), proj_out_2 (D → output_dim)
        "state_encoder": (state_dim * mlp + mlp) + (mlp * d + d),
        "action_encoder": (action_dim * d + d) + (2 * d * d + d) + (d * d + d),
        "action_decoder": (decoder_in * mlp + mlp) + (mlp * action_dim + action_dim),
        "future_tokens": 32 * d,
        "position_embedding": 1024 * d,
    }
    return counts


@pytest.mark.parametrize(
    "variant, vlm_config, expected",
    [
        # GR00T: DiT-B (D 768), 16 blocks interleaved: even blocks k/v from the VLM (2048), odd from D; output 1024
        ("gr00t", QWEN2_5_VL_3B, flow_head_params(768, 16, [2048, 768] * 8, 1024)),
        # PI: D = 2048, 36 blocks (one per LLM layer), k/v at D; proj_out_2 → 26 unused; decoder reads D
        ("pi", QWEN2_5_VL_3B, flow_head_params(2048, 36, [2048] * 36, 26, vlm_hidden=2048)),
        # PI_v3: D = 1024 (16 heads × 64), 36 blocks on Qwen3-VL-4B, plus 36 × (LayerNorm(2560) + Linear 2560 → 1024)
        ("pi_v3", QWEN3_VL_4B, {**flow_head_params(1024, 36, [1024] * 36, 26, vlm_hidden=2560),
                                "project_layers": 36 * ((2 * 2560) + (2560 * 1024 + 1024))}),  # fmt: skip
    ],
)
def test_head_matches_starvla_at_published_config(variant, vlm_config, expected):
    config = AutoConfig.for_model(f"vla_{variant}", vlm_config=vlm_config.to_dict(), action_dim=7, action_horizon=16, state_dim=7)
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.action_head.named_children()}
    assert counts == expected
    keys = {k for k, _ in model.action_head.named_parameters()}
    for key in ["model.timestep_encoder.timestep_embedder.linear_1.weight", "model.transformer_blocks.0.norm1.linear.weight",
                "model.transformer_blocks.0.attn1.to_k.weight", "model.transformer_blocks.0.attn1.to_out.0.bias",
                "model.transformer_blocks.0.ff.net.0.proj.weight", "model.transformer_blocks.0.ff.net.2.weight",
                "model.proj_out_1.weight", "model.proj_out_2.weight", "action_encoder.layer3.weight",
                "action_decoder.layer2.weight", "state_encoder.layer1.weight", "future_tokens.weight",
                "position_embedding.weight"]:  # fmt: skip
        assert key in keys, key
    assert model.config.state_in_prompt == (variant == "pi_v3")


def test_padded_batch_matches_single_samples_when_masking(flow):
    """With condition_mask="always" (the default), left padding does not change a sample's chunk: three prompts of
    different lengths batched give each one's own chunk for the same noise. Measured max |Δ| 3e-7; a head that read
    the padding ("never") was 1.5e-3 to 2e-2 away (an initialised head's, 4e-6: hence the moving head)."""
    _, _, model, processor = flow
    model = with_moving_head(model)
    rng = np.random.default_rng(7)
    views, state = random_views(rng, 3), rng.normal(size=(3, 6))
    text = ["open", "open the top drawer of the cabinet slowly", "close the door"]
    noise = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    inputs = processor(images=views, text=text, state=state)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3
    batched = model.predict_action(**inputs, noise=noise)
    assert torch.equal(model.predict_action(**inputs, noise=noise), batched)
    for i in range(3):
        single = model.predict_action(**processor(images=views[i : i + 1], text=text[i : i + 1], state=state[i : i + 1]),
                                      noise=noise[i : i + 1])  # fmt: skip
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("condition_mask, in_training, at_inference", [
    ("always", True, True), ("training", True, False), ("never", False, False)])  # fmt: skip
def test_condition_mask_setting_decides_when_the_head_sees_the_padding_mask(tiny_vlm_dirs, condition_mask,
                                                                             in_training, at_inference):
    """"training" masks the prompt padding in the training loss only (StarVLA runs whose inference attended to it)."""
    model, processor = make_flow(tiny_vlm_dirs["qwen2_5_vl"], "gr00t", condition_mask=condition_mask)
    rng = np.random.default_rng(3)
    inputs = processor(images=random_views(rng, 2), text=["open", "open the top drawer of the cabinet slowly"],
                       state=rng.normal(size=(2, 6)))  # fmt: skip
    padding = inputs["attention_mask"].bool()
    assert not padding.all()
    seen = {}

    def recording(step, method):  # the head's method, noting the condition mask it is given
        def call(conditions, mask, *args, **kwargs):
            seen[step] = mask
            return method(conditions, mask, *args, **kwargs)

        return call

    model.action_head.forward = recording("loss", model.action_head.forward)
    model.action_head.sample = recording("predict", model.action_head.sample)
    with torch.no_grad():
        model(**inputs, actions=torch.zeros(2, 4, 7))
        model.predict_action(**inputs)
    for step, expected in (("loss", in_training), ("predict", at_inference)):
        assert (seen[step] is not None) == expected, step
        if expected:
            assert torch.equal(seen[step], padding), step
