"""Every variant across attention implementations, bf16, activation checkpointing, batch composition and packed
linear weights.

Untrained tiny models make weak witnesses: an initialised flow or OFT head barely moves its output, and the action
tokens `from_vlm` adds start at the mean of the old embeddings, so greedy decoding writes the same tokens whatever the
prompt. The models here get heads and action-token rows drawn wider (`_make_outputs_depend_on_inputs`), so that a
difference in what reaches the head shows in the chunk.
"""

import importlib.util

import pytest
import torch

from hf_vla import AutoModelForVLA
from hf_vla.testing import build_tiny_vla, random_observation

VARIANTS = ["oft", "fast", "bins", "pi", "pi_v3", "gr00t"]
FLOW_VARIANTS = ("pi", "pi_v3", "gr00t")
TOKEN_VARIANTS = ("fast", "bins")
PROMPTS = ["open", "open the top drawer of the cabinet and put the carrot on the plate", "close the door"]


def _make_outputs_depend_on_inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if model.config.variant in TOKEN_VARIANTS:  # own rows for the action tokens (std 0.02, as a fresh embedding)
            start = model.config.action_token_offset
            rows = slice(start, start + model.config.num_action_tokens)
            for weight in (model.get_input_embeddings().weight, model.vlm.lm_head.weight):
                weight[rows] = torch.randn(weight[rows].shape, generator=generator) * 0.02
        else:
            for parameter in model.action_head.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module", params=VARIANTS)
def saved(request, tmp_path_factory):
    """(variant, saved model directory, processor)."""
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    overrides = {"dropout": 0.0} if variant in FLOW_VARIANTS else {}
    model, processor = build_tiny_vla(variant, out_dir=root / "build", state_dim=6, **overrides)
    _make_outputs_depend_on_inputs(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return variant, root / "model", processor


def prompts_of_three_lengths(processor, with_actions=False):
    observation = {**random_observation(processor, batch_size=3, seed=3, with_actions=with_actions), "text": PROMPTS}
    inputs = processor(**observation)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # three amounts of left padding
    return observation, inputs


def predict(model, variant, inputs, rows=slice(None)):
    """The chunk (flow: from fixed noise, its `rows` of a batch of three) or, for a token variant, its greedy action
    tokens."""
    if variant in TOKEN_VARIANTS:
        return model.generate_actions(**inputs).action_token_ids
    if variant in FLOW_VARIANTS:
        noise = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))[rows]
        return model.predict_action(**inputs, noise=noise)
    return model.predict_action(**inputs)


def assert_same_prediction(first, second, atol):
    if isinstance(first, list):
        assert first == second
    else:
        torch.testing.assert_close(first, second, rtol=0, atol=atol)


def test_eager_and_sdpa_predict_the_same(saved):
    """`from_pretrained(attn_implementation="eager")` reaches every attention of the backbone (text and vision). The
    heads' own attention (DiT) is torch SDPA whatever the setting. Measured max |Δ| ≤ 4e-7; tokens identical."""
    variant, path, processor = saved
    sdpa = AutoModelForVLA.from_pretrained(path)
    eager = AutoModelForVLA.from_pretrained(path, attn_implementation="eager")
    for model, expected in ((sdpa, "sdpa"), (eager, "eager")):
        configs = (model.config, model.vlm.config, model.vlm.config.text_config, model.vlm.config.vision_config)
        assert [config._attn_implementation for config in configs] == [expected] * 4
    _, inputs = prompts_of_three_lengths(processor)
    reference = predict(sdpa, variant, inputs)
    assert_same_prediction(predict(eager, variant, inputs), reference, atol=1e-5)


def test_flash_attention_2_without_the_package_is_refused(tmp_path):
    """transformers refuses it before loading (an ImportError naming FlashAttention2), rather than falling back."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    model, _ = build_tiny_vla("oft", out_dir=tmp_path / "build")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ImportError, match="FlashAttention2"):
        AutoModelForVLA.from_pretrained(tmp_path / "model", attn_implementation="flash_attention_2")


def test_a_sample_alone_and_in_a_left_padded_batch_predict_the_same(saved):
    """Two calls agree exactly; each of three prompts of different lengths batched gives its own chunk (same noise)
    or tokens (greedy, with and without the KV cache). Measured max |Δ| ≤ 3e-7."""
    variant, path, processor = saved
    model = AutoModelForVLA.from_pretrained(path)
    observation, inputs = prompts_of_three_lengths(processor)
    batched = predict(model, variant, inputs)
    assert_same_prediction(predict(model, variant, inputs), batched, atol=0)
    if variant in TOKEN_VARIANTS:
        assert len({tuple(tokens) for tokens in batched}) == 3  # the prompts decode differently
        assert model.generate_actions(**inputs, use_cache=False).action_token_ids == batched
    for i in range(3):
        alone = processor(**{key: value[i : i + 1] for key, value in observation.items()})
        assert_same_prediction(predict(model, variant, alone, rows=slice(i, i + 1)), batched[i : i + 1], atol=1e-5)


def loss_and_gradients(model, inputs, options):
    model.zero_grad()
    loss = model(**inputs, **options).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def fixed_flow_sample(model, batch):
    """Noise and time for a flow model's training loss, so that two losses can be compared."""
    if model.config.variant not in FLOW_VARIANTS:
        return {}
    rows = model.config.repeated_diffusion_steps * batch
    generator = torch.Generator().manual_seed(1)
    return {"noise": torch.randn(rows, 4, 7, generator=generator), "time": torch.rand(rows, generator=generator)}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_activation_checkpointing_gives_the_same_loss_and_gradients(saved, monkeypatch):
    """The backbone's layers, and a flow head's DiT blocks, run again in the backward pass (counted: module hooks do
    not see the replay), to the same loss and gradients (measured: identical)."""
    variant, path, processor = saved
    model = AutoModelForVLA.from_pretrained(path).train()
    _, inputs = prompts_of_three_lengths(processor, with_actions=True)
    options = fixed_flow_sample(model, 3)
    calls, counted = [], [model.vlm.model.language_model.layers[0].mlp]
    if variant in FLOW_VARIANTS:
        counted.append(model.action_head.model.transformer_blocks[0].ff)
    for module in counted:
        monkeypatch.setattr(module, "forward", lambda *args, forward=module.forward, name=type(module).__name__:
                            calls.append(name) or forward(*args))  # fmt: skip
    loss, gradients = loss_and_gradients(model, inputs, options)
    assert len(calls) == len(counted)
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, inputs, options)
    assert len(calls) == 3 * len(counted)  # forward, then forward again in backward
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert checkpointed_gradients.keys() == gradients.keys() and len(gradients) > 20
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=0, atol=1e-7, msg=name)


def flat(gradients):
    return torch.cat([gradient.float().flatten() for _, gradient in sorted(gradients.items())])


def test_bf16_training_loss_and_gradients_are_close_to_float32(saved):
    """The same batch (and flow sample) through a float32 model under bf16 autocast and through a model loaded in bf16:
    finite float32 losses within 0.2% of float32's (measured ≤ 4.2e-4 relative) and gradients pointing the same way
    (cosine similarity measured ≥ 0.9967)."""
    variant, path, processor = saved
    _, inputs = prompts_of_three_lengths(processor, with_actions=True)
    model = AutoModelForVLA.from_pretrained(path).train()
    options = fixed_flow_sample(model, 3)
    loss, gradients = loss_and_gradients(model, inputs, options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss, autocast_gradients = loss_and_gradients(model, inputs, options)
    low = AutoModelForVLA.from_pretrained(path, dtype=torch.bfloat16).train()
    low_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    low_loss, low_gradients = loss_and_gradients(low, low_inputs, options)
    for value, other in ((autocast_loss, autocast_gradients), (low_loss, low_gradients)):
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert other.keys() == gradients.keys() and torch.isfinite(flat(other)).all()
        cosine = torch.nn.functional.cosine_similarity(flat(other), flat(gradients), dim=0)
        torch.testing.assert_close(value, loss, rtol=2e-3, atol=0)
        assert cosine > 0.99


def test_packed_linear_weights_predict_the_same_and_a_bf16_cast_runs_plain(saved, monkeypatch):
    """`VLAPolicy(..., pack_linear_weights=True)` (every layer packed here, the tiny ones too): the same prediction
    within 1e-5 in float32 (measured ≤ 4e-7; tokens identical). Cast to bf16 afterwards, the packed layers run
    `nn.Linear`'s own bf16 forward: exactly the unpacked bf16 model's prediction."""
    from hf_vla import VLAPolicy, packed_linear
    from hf_vla.packed_linear import PackedLinear

    variant, path, processor = saved
    _, inputs = prompts_of_three_lengths(processor)
    expected = predict(AutoModelForVLA.from_pretrained(path), variant, inputs)
    monkeypatch.setattr(packed_linear, "DEFAULT_MIN_WEIGHT_NUMEL", 0)
    model = VLAPolicy(AutoModelForVLA.from_pretrained(path), processor, pack_linear_weights=True).model
    assert sum(type(module) is PackedLinear for module in model.modules()) > 20
    assert_same_prediction(predict(model, variant, inputs), expected, atol=1e-5)

    low_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    plain = predict(AutoModelForVLA.from_pretrained(path).to(torch.bfloat16), variant, low_inputs)
    assert_same_prediction(predict(model.to(torch.bfloat16), variant, low_inputs), plain, atol=0)
    assert all(module._packed is None for module in model.modules() if type(module) is PackedLinear)


def test_every_variant_returns_float32_chunks_at_any_model_dtype(saved):
    """`predict_action` returns float32 whether the model runs in float32 or bf16 (flow heads integrate in float32,
    OFT's head output is cast), so chunks from differently loaded models compare and decode alike."""
    variant, path, processor = saved
    inputs = processor(**random_observation(processor, batch_size=1, seed=1))
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForVLA.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            chunk = model.predict_action(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
        assert chunk.dtype == torch.float32 and chunk.shape == (1, model.config.action_horizon, model.config.action_dim)
