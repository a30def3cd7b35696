"""hf_vla's GR00T variant against an independent plain-torch reference of StarVLA's QwenGR00T computation.

The reference below reads nothing from hf_vla but a flat state dict under StarVLA's names (`to_starvla`) and is
written from StarVLA's source (github.com/starVLA/starVLA):

- framework: `starVLA/model/framework/VLM4A/QwenGR00T.py` (`Qwen_GR00T.forward` / `.predict_action`);
- head: `starVLA/model/modules/action_model/GR00T_ActionHeader.py` (`ActionEncoder`, `FlowmatchingActionHead`);
- DiT: `starVLA/model/modules/action_model/flow_matching_head/cross_attention_dit.py` (`TimestepEncoder`,
  `AdaLayerNorm`, `BasicTransformerBlock`, `DiT`), built from diffusers' `Timesteps`, `TimestepEmbedding`,
  `Attention` (AttnProcessor2_0) and `FeedForward("gelu-approximate")`;
- time features: `starVLA/model/modules/action_model/flow_matching_head/action_encoder.py`
  (`SinusoidalPositionalEncoding`).

Encoder (prompt padding) mask. StarVLA has changed here, so the framework-level checks name the snapshot they follow:

- "no_mask": `starVLA/starVLA@e8a754e` `VLM4A/QwenGR00T.py` (and the older `framework/QwenGR00T.py@3a0efe3`) call
  `self.action_model(last_hidden_repeated, actions_target_repeated, state_repeated)` and
  `self.action_model.predict_action(last_hidden, state)`: padded prompt tokens are attended to in training and in
  inference (issue #330, 2026-05-13: "we have pr for this, waitting to merge").
- "masked": later code (after #330; seen in a mirror of upstream, gaoxiang12/starVLA@26e4cd3 `VLM4A/QwenGR00T.py`,
  and required verbatim of the official file by an independent pinned-source oracle) repeats
  `qwen_inputs["attention_mask"]` like the hidden states and passes it as `encoder_attention_mask` in `forward`, and
  passes `encoder_attention_mask=backbone_attention_mask` (bool) to `predict_action` too; the head hands it to the
  DiT's cross-attention blocks only (self-attention blocks get None) in both paths.
Neither snapshot masks in training only.
"""

import math

import numpy as np
import pytest
import starvla_reference as ref
import torch
import torch.nn.functional as F
from conftest import random_views
from test_convert_starvla import COT, write_run
from test_convert_starvla import to_starvla as _to_starvla
from transformers import AutoConfig, AutoModelForImageTextToText

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.hub.convert_starvla import convert_starvla
from hf_vla.testing import build_tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

A, H, S, R = 7, 4, 5, 3  # action dim, horizon, state dim, repeated_diffusion_steps
HEAD = dict(dit_hidden_size=32, attention_head_dim=16, num_dit_layers=4, dit_output_dim=24, head_hidden_size=40,
            num_future_tokens=8, repeated_diffusion_steps=R, dropout=0.0)  # fmt: skip
TOL = dict(atol=1e-5, rtol=1e-5)
# encoder mask StarVLA hands the DiT (training, inference), per snapshot (module docstring)
STARVLA_MASKING = {"no_mask": (False, False), "masked": (True, True)}


def to_starvla(model) -> dict:
    return _to_starvla(model.state_dict(), "gr00t")


# ---------------------------------------------------------------------------------------------------- reference


def _dit(sd, tokens, buckets, vl_embs, mask, head_dim, interleave=True):
    """cross_attention_dit.DiT.forward: even blocks attend to the VL tokens (with the encoder mask), odd ones (when
    interleaved) to themselves; output `shift, scale` = proj_out_1(silu(temb)) (shift first), LayerNorm(eps 1e-6),
    proj_out_2."""
    temb = ref.timestep_embedding(sd, buckets)
    x = tokens
    for i in range(ref.num_blocks(sd)):
        x = ref.block(sd, i, x, temb, None if interleave and i % 2 == 1 else vl_embs, mask, head_dim)
    shift, scale = ref.linear(sd, f"{ref.DIT}proj_out_1", F.silu(temb)).chunk(2, dim=1)
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return ref.linear(sd, f"{ref.DIT}proj_out_2", x)


def _velocity(sd, noisy, buckets, vl_embs, mask, state, head_dim):
    """FlowmatchingActionHead: action tokens = layer3(swish(layer2([layer1(a), sin/cos(bucket)]))) + learned position
    embedding (positions 0..H−1); DiT input [state token (if any), future tokens, action tokens]; decoder on the DiT
    output, read at the last H positions."""
    batch, horizon, _ = noisy.shape
    features = ref.linear(sd, "action_model.action_encoder.layer1", noisy)
    tau = ref.action_time_features(buckets[:, None].expand(batch, horizon), features.shape[-1]).to(features.dtype)
    features = F.silu(ref.linear(sd, "action_model.action_encoder.layer2", torch.cat([features, tau], dim=-1)))
    features = ref.linear(sd, "action_model.action_encoder.layer3", features)
    features = features + sd["action_model.position_embedding.weight"][:horizon][None]
    tokens = [sd["action_model.future_tokens.weight"][None].expand(batch, -1, -1), features]
    if state is not None:
        tokens.insert(0, ref.mlp(sd, "action_model.state_encoder", state))
    out = _dit(sd, torch.cat(tokens, dim=1), buckets, vl_embs, mask, head_dim)
    return ref.mlp(sd, "action_model.action_decoder", out)[:, -horizon:]


def starvla_loss(sd, vl_embs, mask, actions, state, noise, time, repeats, head_dim):
    """Qwen_GR00T.forward + FlowmatchingActionHead.forward. The framework tiles the batch `repeats` times
    (`x.repeat(R, 1, 1)`: row r·B + b is sample b), the head draws one noise/time per row; `noise` [R·B, H, A] and
    `time` [R·B] stand in for those draws. t = 1 is clean data; bucket = (t·1000).long(); loss = plain mean."""
    vl_embs, actions = vl_embs.repeat(repeats, 1, 1), actions.repeat(repeats, 1, 1)
    mask = None if mask is None else mask.repeat(repeats, 1).bool()
    state = None if state is None else state.repeat(repeats, 1, 1)  # StarVLA's state is [B, 1, S]
    t = time[:, None, None]
    noisy, target = (1 - t) * noise + t * actions, actions - noise
    buckets = (time * 1000).long()
    pred = _velocity(sd, noisy, buckets, vl_embs, mask, state, head_dim)
    return ((pred - target) ** 2).mean()


def starvla_sample(sd, vl_embs, mask, state, noise, num_steps, head_dim):
    """FlowmatchingActionHead.predict_action: Euler from x_0 = noise; step k at t = k/float(N), bucket int(t·1000),
    x += (1/N)·v."""
    actions, dt = noise, 1.0 / num_steps
    for k in range(num_steps):
        bucket = int(k / float(num_steps) * 1000)
        buckets = torch.full((noise.shape[0],), bucket, dtype=torch.long)
        actions = actions + dt * _velocity(sd, actions, buckets, vl_embs, mask, state, head_dim)
    return actions


def starvla_condition(vlm_dir, sd, vlm_inputs):
    """Qwen_GR00T: `qwen_vl_interface(**qwen_inputs, output_hidden_states=True).hidden_states[-1]`, where
    `qwen_vl_interface.model` is the transformers Qwen-VL ForConditionalGeneration holding the checkpoint's
    `qwen_vl_interface.model.*` weights."""
    vlm = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(vlm_dir))
    prefix = "qwen_vl_interface.model."
    vlm.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    with torch.no_grad():
        return vlm.eval()(**vlm_inputs, output_hidden_states=True, return_dict=True).hidden_states[-1]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "Qwen2.5-VL-tiny-Instruct", family="qwen2_5_vl")


@pytest.fixture(scope="module")
def gr00t(vlm_dir):
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="gr00t", action_dim=A, action_horizon=H, state_dim=S, **HEAD)
    with torch.no_grad():  # O(1) signals everywhere (the initialiser's small weights and zero biases hide errors)
        for name, param in model.action_head.named_parameters():
            fan_in = param.shape[-1] if param.dim() == 2 and "embedding" not in name and "tokens" not in name else 1
            param.normal_(0.0, 1.0 / math.sqrt(fan_in) if param.dim() == 2 else 0.1)
    return model.eval(), to_starvla(model)


@pytest.fixture(scope="module")
def padded_batch(vlm_dir, gr00t):
    """A left-padded batch of 2 (instructions of different lengths) and fixed flow-matching draws."""
    model, _ = gr00t
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary"], image_size=[56, 56])
    rng = np.random.default_rng(0)
    inputs = processor(images=random_views(rng, 2, cameras=1, size=56),
                       text=["open the top drawer of the cabinet and put the bowl inside", "stop"])  # fmt: skip
    vlm_inputs = {k: v for k, v in inputs.items() if k not in ("state", "actions", "action_mask")}
    mask = vlm_inputs["attention_mask"]
    assert mask[1, 0] == 0 and mask[:, -1].all() and mask[0].all(), "expected sample 1 to be left-padded"
    g = torch.Generator().manual_seed(1)
    return dict(
        vlm_inputs=vlm_inputs,
        actions=torch.randn(2, H, A, generator=g),
        state=torch.randn(2, 1, S, generator=g),
        train_noise=torch.randn(R * 2, H, A, generator=g),
        # edge buckets: 0, 999, exactly 250 / 500, t = 1 (bucket 1000), and values just below a bucket boundary
        time=torch.tensor([0.0, 0.9995, 0.25, 0.5, 1.0, 0.3339]),
        noise=torch.randn(2, H, A, generator=g),
    )


def head_dim_of(model):
    return model.config.attention_head_dim


# ---------------------------------------------------------------------------------------------------- head level


def left_padded_conditions(model, generator, row, pads, with_mask, batch=2, length=9):
    """Random conditions [batch, length, H_vlm] and their key padding mask with `pads` left-padded tokens in `row`
    (None when not `with_mask`)."""
    conditions = torch.randn(batch, length, model.vlm_hidden_size, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[row, :pads] = False
    return conditions, mask if with_mask else None


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no_state"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["unmasked", "masked"])
def test_head_loss_matches_reference(gr00t, with_state, with_mask):
    model, sd = gr00t
    g = torch.Generator().manual_seed(2)
    conditions, mask = left_padded_conditions(model, g, row=1, pads=4, with_mask=with_mask)
    B = conditions.shape[0]
    actions, state = torch.randn(B, H, A, generator=g), torch.randn(B, 1, S, generator=g) if with_state else None
    noise, time = torch.randn(R * B, H, A, generator=g), torch.tensor([0.0, 0.9995, 0.25, 0.5, 1.0, 0.0419])
    with torch.no_grad():
        ours = model.action_head(conditions, mask, actions, state=state, noise=noise, time=time)
    reference = starvla_loss(sd, conditions, mask, actions, state, noise, time, R, head_dim_of(model))
    torch.testing.assert_close(ours, reference, **TOL)
    # the tiling matters: pairing row i with sample i // R (interleaved copies) gives another loss
    def copies(x):
        return None if x is None else x.repeat_interleave(R, 0)

    interleaved = starvla_loss(sd, copies(conditions), copies(mask), copies(actions), copies(state), noise, time, 1,
                               head_dim_of(model))  # fmt: skip
    assert not torch.allclose(ours, interleaved, **TOL)


@pytest.mark.parametrize("num_steps", [1, 3, 4, 7])
@pytest.mark.parametrize("with_mask", [False, True], ids=["unmasked", "masked"])
def test_head_sample_matches_reference(gr00t, num_steps, with_mask):
    model, sd = gr00t
    g = torch.Generator().manual_seed(3)
    conditions, mask = left_padded_conditions(model, g, row=0, pads=5, with_mask=with_mask)
    B = conditions.shape[0]
    state, noise = torch.randn(B, 1, S, generator=g), torch.randn(B, H, A, generator=g)
    ours = model.action_head.sample(conditions, mask, state=state, noise=noise, num_steps=num_steps)
    reference = starvla_sample(sd, conditions, mask, state, noise, num_steps, head_dim_of(model))
    torch.testing.assert_close(ours, reference, **TOL)
    if with_mask:  # the mask must reach the DiT: padded tokens hidden ≠ attended
        unmasked = starvla_sample(sd, conditions, None, state, noise, num_steps, head_dim_of(model))
        assert not torch.allclose(reference, unmasked, **TOL)


def test_training_time_sampling_clamps_like_starvla(gr00t):
    """GR00T_ActionHeader.sample_time: (s − u)/s with u ~ Beta(1.5, 1) clamped to u ≤ s, so t is never negative
    (the layer-wise head does not clamp; test_starvla_reference_layerwise)."""
    model, _ = gr00t
    torch.manual_seed(0)
    got = model.action_head.sample_time(20000)
    torch.manual_seed(0)
    u = torch.distributions.Beta(1.5, 1.0).sample([20000])
    assert (u > 0.999).any()  # draws the clamp changes are in this sample
    torch.testing.assert_close(got, (0.999 - u.clamp(max=0.999)) / 0.999, atol=1e-7, rtol=0)
    assert got.min() >= 0


def test_reference_pieces_against_known_values():
    """Spot checks of the reference's hand-written formulas (sinusoid layouts, bucket rounding)."""
    tau = ref.action_time_features(torch.tensor([3.0]), 8)  # half 4: f_k = 1e4^(-k/4)
    expected = [math.sin(3 * 10000 ** (-k / 4)) for k in range(4)] + [math.cos(3 * 10000 ** (-k / 4)) for k in range(4)]
    torch.testing.assert_close(tau[0], torch.tensor(expected))
    emb = ref.timestep_features(torch.tensor([7]), channels=8)  # half 4, shift 1: f_k = 1e4^(-k/3), cos first
    expected = [math.cos(7 * 10000 ** (-k / 3)) for k in range(4)] + [math.sin(7 * 10000 ** (-k / 3)) for k in range(4)]
    torch.testing.assert_close(emb[0], torch.tensor(expected))
    assert [int(k / float(7) * 1000) for k in range(7)] == [0, 142, 285, 428, 571, 714, 857]
    assert (torch.tensor([0.9995, 0.3339, 1.0]) * 1000).long().tolist() == [999, 333, 1000]


# ---------------------------------------------------------------------------------------------------- model level


def test_condition_is_starvla_last_hidden_state(vlm_dir, gr00t, padded_batch):
    """StarVLA conditions the head on `hidden_states[-1]` of the full Qwen-VL forward (the final-norm output), on the
    left-padded batch as it is."""
    model, sd = gr00t
    vlm_inputs = padded_batch["vlm_inputs"]
    expected = starvla_condition(vlm_dir, sd, vlm_inputs)
    with torch.no_grad():
        ours, _ = model.conditions(**vlm_inputs)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("condition_mask, snapshot", [("never", "no_mask"), ("always", "masked")])
def test_model_matches_starvla_snapshot(vlm_dir, gr00t, padded_batch, condition_mask, snapshot):
    """hf_vla's `condition_mask` setting that reproduces each StarVLA snapshot, end to end on a left-padded batch."""
    model, sd = gr00t
    train_masked, infer_masked = STARVLA_MASKING[snapshot]
    model.config.condition_mask = condition_mask
    try:
        _check_model_against_starvla(vlm_dir, model, sd, padded_batch, train_masked, infer_masked)
    finally:
        model.config.condition_mask = "always"


@pytest.mark.parametrize("run_id, snapshot", [("gr00t_libero_2026-09-01", "masked"), ("gr00t_libero", "no_mask")])
def test_converted_starvla_gr00t_run_matches_starvla(vlm_dir, gr00t, padded_batch, tmp_path, run_id, snapshot):
    """A StarVLA QwenGR00T run converted by `convert_starvla`, against the StarVLA code of its date: a run dated after
    the masking fix against the "masked" snapshot (the prompt's padding mask reaches the DiT in training and in
    inference), an undated one against the older "no_mask" snapshot (as released checkpoints were trained)."""
    model, sd = gr00t
    action_model = {
        "action_model_type": "DiT-B", "action_dim": A, "state_dim": S, "action_horizon": H,
        "hidden_size": HEAD["head_hidden_size"], "repeated_diffusion_steps": R,
        "num_target_vision_tokens": HEAD["num_future_tokens"], "num_inference_timesteps": 4,
        "diffusion_model_cfg": {"input_embedding_dim": 32, "attention_head_dim": 16, "num_attention_heads": 2,
                                "num_layers": HEAD["num_dit_layers"], "output_dim": HEAD["dit_output_dim"],
                                "cross_attention_dim": model.vlm_hidden_size, "dropout": 0.2, "final_dropout": True,
                                "interleave_self_attention": True},
    }  # fmt: skip
    run = write_run(tmp_path / "run", "QwenGR00T", vlm_dir, sd, action_model,
                    {"CoT_prompt": COT, "obs_image_size": [56, 56], "obs": ["image_0"]}, run_id=run_id)  # fmt: skip
    converted = AutoModelForVLA.from_pretrained(convert_starvla(run, tmp_path / "out")).eval()
    train_masked, infer_masked = STARVLA_MASKING[snapshot]
    _check_model_against_starvla(vlm_dir, converted, sd, padded_batch, train_masked, infer_masked)


def _check_model_against_starvla(vlm_dir, model, sd, batch, train_masked, infer_masked):
    vlm_inputs, actions, state = batch["vlm_inputs"], batch["actions"], batch["state"]
    condition = starvla_condition(vlm_dir, sd, vlm_inputs)
    padding = vlm_inputs["attention_mask"].bool()
    head_dim = head_dim_of(model)

    with torch.no_grad():
        loss = model(**vlm_inputs, actions=actions, state=state[:, 0], noise=batch["train_noise"],
                     time=batch["time"]).loss  # fmt: skip
    expected_loss = starvla_loss(sd, condition, padding if train_masked else None, actions, state,
                                 batch["train_noise"], batch["time"], R, head_dim)  # fmt: skip
    torch.testing.assert_close(loss, expected_loss, **TOL, msg=lambda m: f"training loss vs StarVLA: {m}")

    for num_steps in (4, 3):
        predicted = model.predict_action(**vlm_inputs, state=state[:, 0], noise=batch["noise"], num_steps=num_steps)
        expected = starvla_sample(sd, condition, padding if infer_masked else None, state, batch["noise"], num_steps,
                                  head_dim)  # fmt: skip
        torch.testing.assert_close(predicted, expected, **TOL,
                                   msg=lambda m: f"predict_action ({num_steps} steps) vs StarVLA: {m}")  # fmt: skip
    # sample 0 has no padding: the mask cannot change it; sample 1 is left-padded: masking must matter for it
    unmasked = starvla_sample(sd, condition, None, state, batch["noise"], 4, head_dim)
    masked = starvla_sample(sd, condition, padding, state, batch["noise"], 4, head_dim)
    torch.testing.assert_close(unmasked[0], masked[0], **TOL)
    assert not torch.allclose(unmasked[1], masked[1], **TOL)
