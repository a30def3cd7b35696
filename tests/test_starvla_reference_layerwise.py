"""hf_vla's layer-wise flow-matching VLAs (`vla_pi` = StarVLA QwenPI, `vla_pi_v3` = QwenPI_v3) against an independent
plain-torch reference of what StarVLA computes with the same weights.

The reference below reads nothing from hf_vla but a flat state dict under StarVLA's names (`to_starvla`, written from
starvla.md §10). It follows StarVLA's code, starVLA/starVLA branch `starVLA_dev`:

- head: `starVLA/model/modules/action_model/LayerwiseFM_ActionHeader.py`, `LayerwiseFlowmatchingActionHead`
  (`sample_time`, `forward`, `predict_action`; PR #373 routes both through `DiT.forward(..., return_pre_output=True)`),
  its `ActionEncoder` / `MLP`, and `flow_matching_head/action_encoder.py::SinusoidalPositionalEncoding` (GR00T's);
- DiT: `flow_matching_head/cross_attention_dit.py` (`TimestepEncoder` = diffusers `Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)` + `TimestepEmbedding`, `AdaLayerNorm`, `BasicTransformerBlock`, `DiT.forward`: block `i`
  with `i` odd, `interleave_self_attention` and `use_canonical_forward` self-attends with no encoder states and no
  mask, every other block cross-attends to `encoder_hidden_states[i]` with the encoder mask;
  `use_canonical_forward=False` is the legacy all-cross forward);
- frameworks: `starVLA/model/framework/VLM4A/QwenPI.py` / `QwenPI_v3.py` (`hidden_states[-N:]` of the Qwen-VL forward,
  `project_layers[i] = LayerNorm + Linear`, `.repeat(R, 1, 1)` of actions / layers / state, state bins in the prompt via
  `share_tools.state2str_transform`);
- released YAMLs and `QwenPI_v3DefaultConfig`: `positional_embeddings: null`, `norm_type: ada_norm`,
  `add_pos_embed: true`.

Training times follow StarVLA's layer-wise sampler exactly: no clamp of u ≤ s (unlike the GR00T head), so a few
draws in a thousand are slightly negative, and StarVLA's truncating `.long()` maps them to bucket 0.

Everything runs in float32 with dropout 0 (eval), so both sides must agree to ~1e-5.
"""

import math

import numpy as np
import pytest
import starvla_reference as ref
import torch
import torch.nn.functional as F
from test_convert_starvla import to_starvla

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.processing_vla import state_to_text
from hf_vla.testing import build_tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

A, H, S = 7, 4, 5  # action dim, horizon, state dim
NUM_VLM_LAYERS = 3  # blocks 0, 2 cross-attend and block 1 self-attends when interleaved; Qwen3-VL deepstack hits 0, 1
TINY = {
    "pi": dict(attention_head_dim=16, head_hidden_size=48),  # D = VLM width 64, 4 heads
    "pi_v3": dict(dit_hidden_size=32, attention_head_dim=16, head_hidden_size=48),  # D = 32, 2 heads, projectors
}
ATOL = RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Reference: StarVLA's layer-wise head, written from its code (not copied), on a flat StarVLA-named state dict


class StarVLALayerwiseReference:
    """LayerwiseFlowmatchingActionHead (+ QwenPI_v3's project_layers) from `action_model.*` / `project_layers.*`.

    interleave: True = PR #373 canonical forward (odd blocks self-attend), False = legacy all-cross.
    """

    def __init__(self, starvla_state: dict, interleave: bool, head_dim: int, num_buckets: int = 1000):
        self.sd = {k: v.float() for k, v in starvla_state.items() if k.startswith(("action_model.", "project_layers."))}
        self.interleave, self.head_dim, self.num_buckets = interleave, head_dim, num_buckets
        self.num_blocks = ref.num_blocks(self.sd)
        self.width = self.sd["action_model.action_encoder.layer1.weight"].shape[0]

    # QwenPI_v3._project_vl_hidden_for_action: LayerNorm(H_vlm) + Linear(H_vlm → D) per layer (Identity if H == D)
    def project(self, layers):
        out = []
        for i, h in enumerate(layers):
            name = f"project_layers.{i}"
            if name + ".0.weight" in self.sd:
                h = F.layer_norm(h, h.shape[-1:], self.sd[name + ".0.weight"], self.sd[name + ".0.bias"], eps=1e-5)
                h = ref.linear(self.sd, name + ".1", h)
            out.append(h)
        return out

    def velocity(self, layers, noisy_actions, buckets, state=None, mask=None):
        """One head evaluation on projected `layers` (list of [B, L, D]); returns the velocity [B, H, A]."""
        batch, horizon, _ = noisy_actions.shape
        ae = "action_model.action_encoder"
        tau = ref.action_time_features(buckets, self.width)[:, None].expand(batch, horizon, -1)
        features = torch.cat([ref.linear(self.sd, ae + ".layer1", noisy_actions), tau], dim=-1)
        action_tokens = ref.linear(self.sd, ae + ".layer3", F.silu(ref.linear(self.sd, ae + ".layer2", features)))
        # add_pos_embed: learned positions on the action tokens only
        action_tokens = action_tokens + self.sd["action_model.position_embedding.weight"][:horizon][None]
        tokens = [self.sd["action_model.future_tokens.weight"][None].expand(batch, -1, -1), action_tokens]
        if state is not None:  # framework passes state [B, 1, S] → one state token first
            tokens.insert(0, ref.mlp(self.sd, "action_model.state_encoder", state[:, None, :]))
        hidden = torch.cat(tokens, dim=1)
        temb = ref.timestep_embedding(self.sd, buckets)
        for i in range(self.num_blocks):
            # odd blocks (interleaved) self-attend over every DiT token, unmasked; the others cross-attend to layer i
            context = None if self.interleave and i % 2 == 1 else layers[i]
            hidden = ref.block(self.sd, i, hidden, temb, context, mask, self.head_dim)
        # return_pre_output=True: proj_out_1/2 unused; decoder on the last `horizon` positions
        return ref.mlp(self.sd, "action_model.action_decoder", hidden)[:, -horizon:]

    def loss(self, layers, actions, noise, time, repeats, state=None, mask=None):
        """QwenPI(_v3).forward + LayerwiseFlowmatchingActionHead.forward with `noise` / `time` given ([R·B, ...])."""
        layers = [h.repeat(repeats, 1, 1) for h in layers]
        actions = actions.repeat(repeats, 1, 1)
        state = None if state is None else state.repeat(repeats, 1)
        mask = None if mask is None else mask.repeat(repeats, 1)
        t = time[:, None, None]
        noisy = (1 - t) * noise + t * actions
        buckets = (time * self.num_buckets).long()  # truncation toward zero, as `.long()`
        predicted = self.velocity(layers, noisy, buckets, state, mask)
        return ((predicted - (actions - noise)) ** 2).mean()

    def sample(self, layers, noise, num_steps, state=None, mask=None):
        """predict_action: Euler from t = 0, step k at t = k/N, bucket int(t·1000), x += v/N."""
        x = noise
        for k in range(num_steps):
            buckets = torch.full((x.shape[0],), int(k / float(num_steps) * self.num_buckets), dtype=torch.long)
            x = x + (1.0 / num_steps) * self.velocity(layers, x, buckets, state, mask)
        return x


def starvla_time(u, s=0.999):
    """LayerwiseFlowmatchingActionHead.sample_time at starVLA_dev HEAD: (s − u)/s, no clamp (PR #287 changed it to
    s·(1 − u); PR #348 reverted that)."""
    return (s - u) / s


def starvla_state_bins(state):
    """share_tools.state2str_transform: digitize over linspace(-1, 1, 257)[:-1], minus one, space-joined."""
    bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    return " ".join(map(str, bins))


def starvla_hidden_states(vlm, inputs):
    """What StarVLA's `qwen_vl_interface(..., output_hidden_states=True).hidden_states` holds (transformers 4.57's
    recorder: the input of decoder layer 0, then what each decoder layer returns — for Qwen3-VL before the deepstack
    features are added to it — with the last entry replaced by the final-norm output), read here with hooks."""
    language_model = vlm.model.language_model
    first_input, outputs, normed = [], [], []

    def unwrap(value):
        return value[0] if isinstance(value, tuple) else value

    hooks = [language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: first_input.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, i, o: outputs.append(unwrap(o))) for layer in language_model.layers]
    hooks.append(language_model.norm.register_forward_hook(lambda m, i, o: normed.append(o)))
    try:
        with torch.no_grad():
            vlm(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [first_input[0], *outputs[:-1], normed[0]]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layerwise_vlms")
    return {f: build_tiny_vlm(root / f, family=f, num_layers=NUM_VLM_LAYERS) for f in ("qwen2_5_vl", "qwen3_vl")}


def randomize_head(model, seed):
    """Every head parameter random (LayerNorm affine and biases included), so no term can hide behind its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.action_head.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif name.startswith("project_layers.") and name.endswith(".0.weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def make_model(vlm_dir, variant, interleave, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(action_dim=A, action_horizon=H, state_dim=S, dropout=0.0, interleave_self_attention=interleave,
                  **TINY[variant])  # fmt: skip
    kwargs.update(overrides)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, **kwargs).eval()
    randomize_head(model, seed + 1)
    starvla_state = to_starvla(model.state_dict(), variant)
    reference = StarVLALayerwiseReference(starvla_state, interleave, TINY[variant]["attention_head_dim"])
    return model, reference


def left_padding_mask(batch, length, pads):
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :n] = False
    return mask


MODES = [("pi", True), ("pi", False), ("pi_v3", True), ("pi_v3", False)]
MODE_IDS = [f"{v}-{'interleaved' if i else 'all_cross'}" for v, i in MODES]


# ---------------------------------------------------------------------------------------------------------------------
# Head level: given conditions


@pytest.mark.parametrize("variant, interleave", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_head_loss_and_sampling_match_reference(vlm_dirs, variant, interleave, with_state, with_mask):
    model, reference = make_model(vlm_dirs["qwen2_5_vl"], variant, interleave, repeated_diffusion_steps=3)
    head = model.action_head
    assert reference.num_blocks == NUM_VLM_LAYERS and head.num_layers == NUM_VLM_LAYERS
    generator = torch.Generator().manual_seed(11)
    batch, length, repeats = 2, 9, 3
    layers = [torch.randn(batch, length, 64, generator=generator) for _ in range(NUM_VLM_LAYERS)]
    actions = torch.randn(batch, H, A, generator=generator)
    state = torch.randn(batch, S, generator=generator) if with_state else None
    mask = left_padding_mask(batch, length, [3, 0]) if with_mask else None
    noise = torch.randn(repeats * batch, H, A, generator=generator)
    # times on both sides of bucket edges, 0 (pure noise) and 1 (clean: bucket 1000)
    time = torch.tensor([0.0, 0.2345, 0.5, 0.9994, 1.0, 0.0007])

    with torch.no_grad():
        got = head(layers, mask, actions, state=state, noise=noise, time=time)
        expected = reference.loss(reference.project(layers), actions, noise, time, repeats, state, mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)

    start = torch.randn(batch, H, A, generator=generator)
    for steps in (1, 3):
        got = head.sample(layers, mask, state=state, noise=start, num_steps=steps)
        expected = reference.sample(reference.project(layers), start, steps, state, mask)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_head_with_fewer_blocks_reads_the_last_layers(vlm_dirs):
    """num_dit_layers < VLM layers: StarVLA takes `hidden_states[-N:]`, block i reads entry i of those."""
    model, reference = make_model(vlm_dirs["qwen2_5_vl"], "pi_v3", True, num_dit_layers=2, condition_mask="never")
    inputs = _processor(vlm_dirs["qwen2_5_vl"], model)(**_raw_batch())
    conditions, _ = model.conditions(**inputs)
    expected = starvla_hidden_states(model.vlm, _vlm_inputs(inputs))[-2:]
    assert reference.num_blocks == 2 and len(conditions) == 2
    for got, want in zip(conditions, expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    start = torch.randn(2, H, A)
    torch.testing.assert_close(model.predict_action(**inputs, noise=start, num_steps=2),
                               reference.sample(reference.project(expected), start, 2), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------------
# Model level: the conditions come from the Qwen-VL forward


def _processor(vlm_dir, model):
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("bridge", rng.normal(size=(64, A)), rng.normal(size=(64, S)),
                                 action_mode="identity", state_mode="identity")  # fmt: skip
    return processor


def _raw_batch(seed=5):
    rng = np.random.default_rng(seed)
    views = [[rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]
    # prompts of different lengths: the batch is left-padded
    return dict(images=views, text=["open", "open the top drawer of the cabinet"],
                state=rng.uniform(-1.2, 1.2, size=(2, S)), actions=rng.normal(size=(2, H, A)))  # fmt: skip


def _vlm_inputs(inputs):
    names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {k: inputs[k] for k in names if k in inputs}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_conditions_are_the_hidden_states_starvla_reads(vlm_dirs, family):
    """hidden_states[-N:] = outputs of layers 0..N-2 as each layer returns them, then the final-norm output (no
    embedding output). On Qwen3-VL the early layers' entries are taken before the deepstack features are added."""
    model, _ = make_model(vlm_dirs[family], "pi", True)
    inputs = _processor(vlm_dirs[family], model)(**_raw_batch())
    conditions, mask = model.conditions(**inputs)
    expected = starvla_hidden_states(model.vlm, _vlm_inputs(inputs))
    assert len(expected) == NUM_VLM_LAYERS + 1 and len(conditions) == NUM_VLM_LAYERS
    for got, want in zip(conditions, expected[-NUM_VLM_LAYERS:]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert mask is not None and not mask.all()  # left-padded batch (condition_mask="always", the default)
    if family == "qwen3_vl":  # the deepstack injection is real here, so the check above tells pre- from post-injection
        layer1_input = []
        hook = model.vlm.model.language_model.layers[1].register_forward_pre_hook(
            lambda m, args, kwargs: layer1_input.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        try:
            with torch.no_grad():
                model.vlm(**_vlm_inputs(inputs))
        finally:
            hook.remove()
        assert (layer1_input[0] - conditions[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("variant, interleave", MODES, ids=MODE_IDS)
def test_model_loss_and_actions_match_reference(vlm_dirs, family, variant, interleave):
    """StarVLA's layer-wise frameworks pass no padding mask to the head: condition_mask="never" (what the converter
    sets for them). QwenPI feeds the state to the state encoder; QwenPI_v3 writes it into the prompt only."""
    repeats = 2
    model, reference = make_model(vlm_dirs[family], variant, interleave, repeated_diffusion_steps=repeats,
                                  condition_mask="never")  # fmt: skip
    inputs = _processor(vlm_dirs[family], model)(**_raw_batch())
    assert not inputs["attention_mask"].bool().all()  # padded: the mask setting matters
    layers = reference.project(starvla_hidden_states(model.vlm, _vlm_inputs(inputs))[-reference.num_blocks:])
    head_state = inputs["state"] if variant == "pi" else None
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(repeats * 2, H, A, generator=generator)
    time = torch.tensor([0.05, 0.6, 0.999, 0.3])
    with torch.no_grad():
        got = model(**inputs, noise=noise, time=time).loss
    expected = reference.loss(layers, inputs["actions"], noise, time, repeats, head_state)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)

    start = torch.randn(2, H, A, generator=generator)
    got = model.predict_action(**inputs, noise=start, num_steps=4)
    torch.testing.assert_close(got, reference.sample(layers, start, 4, head_state), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_model_with_condition_mask_matches_reference_with_encoder_mask(vlm_dirs, family):
    """condition_mask="always": the prompt's padding mask hides padded tokens from every cross-attention block (as
    DiT.forward's encoder_attention_mask would), never from the self-attention blocks."""
    model, reference = make_model(vlm_dirs[family], "pi", True, condition_mask="always", repeated_diffusion_steps=1)
    inputs = _processor(vlm_dirs[family], model)(**_raw_batch())
    mask = inputs["attention_mask"].bool()
    layers = reference.project(starvla_hidden_states(model.vlm, _vlm_inputs(inputs))[-reference.num_blocks:])
    noise, time = torch.randn(2, H, A), torch.tensor([0.25, 0.75])
    with torch.no_grad():
        got = model(**inputs, noise=noise, time=time).loss
    torch.testing.assert_close(got, reference.loss(layers, inputs["actions"], noise, time, 1, inputs["state"], mask),
                               atol=ATOL, rtol=RTOL)
    start = torch.randn(2, H, A)
    torch.testing.assert_close(model.predict_action(**inputs, noise=start, num_steps=2),
                               reference.sample(layers, start, 2, inputs["state"], mask), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------------
# Training time and the state text


def test_training_time_sampling_matches_starvla(vlm_dirs):
    """StarVLA's LayerwiseFM `sample_time` = (s − u)/s with u ~ Beta(1.5, 1) and no clamp: u > s (about 0.15% of
    draws) gives t in (−0.001001, 0); hf_vla's layer-wise head draws the same. Same RNG stream on both sides."""
    model, _ = make_model(vlm_dirs["qwen2_5_vl"], "pi_v3", False)
    torch.manual_seed(0)
    got = model.action_head.sample_time(20000)
    torch.manual_seed(0)
    u = torch.distributions.Beta(1.5, 1.0).sample([20000])
    assert (u > 0.999).sum() > 0  # the draws where the two formulas part are in this sample
    torch.testing.assert_close(got, starvla_time(u), atol=1e-7, rtol=0)


def reference_bucket(time):
    return (time * 1000).long()  # LayerwiseFlowmatchingActionHead.forward: `(t * num_timestep_buckets).long()`


def test_negative_training_time_buckets_like_starvla(vlm_dirs):
    """StarVLA turns t into its bucket with `.long()` (toward zero: t in (−0.001, 0) → 0, where a floor would give
    −1). Only reachable with such times, which StarVLA's own sampler draws (see above)."""
    model, reference = make_model(vlm_dirs["qwen2_5_vl"], "pi", False, repeated_diffusion_steps=1)
    time = torch.tensor([-0.0005, 0.5])
    assert reference_bucket(time).tolist() == [0, 500]
    generator = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 6, 64, generator=generator) for _ in range(NUM_VLM_LAYERS)]
    actions, noise = torch.randn(2, H, A, generator=generator), torch.randn(2, H, A, generator=generator)
    with torch.no_grad():
        got = model.action_head(layers, None, actions, noise=noise, time=time)
    torch.testing.assert_close(got, reference.loss(layers, actions, noise, time, 1), atol=ATOL, rtol=RTOL)


EDGE_STATES = [
    -3.0, -1.5, -1.0000001, -1.0, -0.9921875, -0.99, -0.5, -0.25, -1e-9, 0.0, 0.0078125, 0.1, 0.5, 0.8,
    0.984375, 0.9921875, 0.9999, 1.0, 1.0000001, 1.5, 3.0,
]  # -1 + k/128 are bin edges (exact in float16/32/64); values outside [-1, 1] on both sides


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_state_text_matches_starvla_helper(dtype):
    state = np.asarray(EDGE_STATES, dtype=dtype)
    assert state_to_text(state) == f"[STATE] {starvla_state_bins(state)} [ACTION]"
    # spot values: below -1 → -1, -1 → 0, each edge starts its bin, 1 and above → 255
    spots = dict(zip(EDGE_STATES, starvla_state_bins(np.asarray(EDGE_STATES)).split()))
    assert [spots[v] for v in (-1.5, -1.0, -0.9921875, 0.0, 0.0078125, 0.9921875, 1.0, 3.0)] == \
        ["-1", "0", "1", "128", "129", "255", "255", "255"]


def test_pi_v3_prompt_holds_starvla_state_text(vlm_dirs):
    """QwenPI_v3.add_discretized_state_to_instruction: "{instruction} [STATE] {bins} [ACTION]" takes the place of
    {instruction} in the prompt template."""
    model, _ = make_model(vlm_dirs["qwen2_5_vl"], "pi_v3", False,
                          prompt_template="Your task is {instruction}. Locate the objects.")  # fmt: skip
    processor = _processor(vlm_dirs["qwen2_5_vl"], model)
    states = np.array([[-1.5, -1.0, 0.0, 0.9921875, 1.25], [0.1, -0.5, 0.8, 1.0, -0.0078125]])
    rng = np.random.default_rng(0)
    views = [[rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]
    inputs = processor(images=views, text=["open the door", "close it"], state=states)
    for b, instruction in enumerate(["open the door", "close it"]):
        text = processor.tokenizer.decode(inputs["input_ids"][b])
        expected = f"Your task is {instruction} [STATE] {starvla_state_bins(states[b])} [ACTION]. Locate the objects."
        assert expected in text, text
