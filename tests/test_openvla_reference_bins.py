"""`vla_bins` against OpenVLA's published discretisation (and LLaVA-VLA's, which reuses it for proprioception).

The reference below is our own short re-statement of OpenVLA's code, not a copy:

- `prismatic/vla/action_tokenizer.py`, `ActionTokenizer` (openvla/openvla, as kept unchanged in the forks
  tthayer93/openvla and jmercat/openvla, which were the copies readable here):
  `__init__`: `bins = linspace(min_action=-1, max_action=1, n_bins)` are *edges*, so `n_bins` edges give
  `n_bins - 1` intervals and `n_bins - 1` centres (midpoints of consecutive edges);
  `__call__`: clip to [-1, 1], `np.digitize(x, bins)` (right=False: an edge value goes to the interval above it),
  giving 1 ... n_bins, and the token id is `tokenizer.vocab_size - digitized` (the vocabulary's last ids, reversed);
  `decode_token_ids_to_actions`: `clip(vocab_size - id - 1, 0, n_bins - 2)` indexes the centres (so the n_bins-th
  token, produced only by values >= 1, decodes like the (n_bins-1)-th).
- `prismatic/extern/hf/modeling_prismatic.py`, `OpenVLAForActionPrediction.predict_action`: the same decode applied to
  the last `action_dim` generated ids, with no check that they are action tokens (any id decodes to some centre).
- LLaVA-VLA (OpenHelix-Team/LLaVA-VLA) `llava/action_tokenizer.py`, `encode_robot_obs`: the normalised robot state goes
  through that same `ActionTokenizer` (n_bins=256), i.e. proprioception uses the action tokens; and
  `llava/serve/flask_server.py`, `LLMRobotServer.compose_robot_input`: static view on top of the gripper view, each
  resized to (S, S // 2) so the stacked image is S x S.
- StarVLA `state2str_transform` (QwenPI_v3 / QwenOFT, share_tools): state bins as numbers,
  `digitize(state, linspace(-1, 1, N + 1)[:-1]) - 1`.

Deliberate differences of hf_vla (documented here, not asserted as equal):
- token ids: bin k is the added special token `<robot_action_k>` (id offset + k, ascending), not `vocab_size - 1 - k`
  of the base vocabulary; only bin indices and decoded values are compared.
- non-finite actions raise (`UniformBins.encode`), where OpenVLA clips +-inf and maps NaN to the top token.
- malformed replies give valid=False / NaN rows; OpenVLA decodes whatever the last action_dim ids are.
- the state text is StarVLA's `[STATE] ... [ACTION]` after the instruction, not LLaVA-VLA's newline-separated layout.

hf_vla's `UniformBins(N)` is OpenVLA's grid for `n_bins = N`: the same edges, the same token for every value (bin
index = OpenVLA's digitized value − 1) and the same decoded centres, so at both defaults (256) a researcher gets the
same discretisation.
"""

import numpy as np
import pytest
import torch

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.action_tokenizers.bins import UniformBins
from hf_vla.processing_vla import state_to_text

T, D, S = 2, 3, 9  # horizon, action dim, state dim of the tiny model
N_BINS = 256  # OpenVLA's default n_bins (256 edges, 255 intervals) and hf_vla's default num_action_tokens
OPENVLA_VOCAB = 32000  # Llama-2's vocabulary size: only used to form OpenVLA-style ids in the reference

# ---------------------------------------------------------------------------------------------------------------------
# Reference (OpenVLA prismatic/vla/action_tokenizer.py, ActionTokenizer)


def ovla_edges_and_centres(n_bins):
    """ActionTokenizer.__init__: n_bins uniform edges over [-1, 1]; centres are midpoints of consecutive edges."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    return edges, (edges[:-1] + edges[1:]) / 2.0


def ovla_digitize(values, n_bins):
    """ActionTokenizer.__call__: clip to [min_action, max_action], then np.digitize against the edges (1 ... n_bins)."""
    return np.digitize(np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0), ovla_edges_and_centres(n_bins)[0])


def ovla_token_ids(values, n_bins, vocab_size=OPENVLA_VOCAB):
    """ActionTokenizer.__call__: token id = vocab_size - digitized."""
    return vocab_size - ovla_digitize(values, n_bins)


def ovla_decode(token_ids, n_bins, vocab_size=OPENVLA_VOCAB):
    """ActionTokenizer.decode_token_ids_to_actions == OpenVLAForActionPrediction.predict_action's decode:
    clip(vocab_size - id - 1, 0, #centres - 1) indexes the bin centres."""
    centres = ovla_edges_and_centres(n_bins)[1]
    return centres[np.clip(vocab_size - np.asarray(token_ids) - 1, 0, centres.shape[0] - 1)]


def ovla_predict_action_decode(generated_ids, action_dim, n_bins, vocab_size=OPENVLA_VOCAB):
    """OpenVLAForActionPrediction.predict_action: the last action_dim generated ids, decoded without any check."""
    return ovla_decode(np.asarray(generated_ids)[-action_dim:], n_bins, vocab_size)


def ovla_index(values, n_bins):
    """The 0-based OpenVLA bin of each value (digitized - 1, in 0 ... n_bins - 1) and the one it decodes to
    (clipped to the n_bins - 2 centres)."""
    index = ovla_digitize(values, n_bins) - 1
    return index, np.clip(index, 0, n_bins - 2)


def hf_index_to_ovla_id(index, vocab_size=OPENVLA_VOCAB):
    """hf_vla bin k <-> OpenVLA's id for 0-based bin k (vocab_size - (k + 1))."""
    return vocab_size - 1 - np.asarray(index)


def starvla_state_bins(state, num_bins=256):
    """StarVLA state2str_transform: digitize against the first num_bins of num_bins + 1 edges, minus 1."""
    return np.digitize(state, np.linspace(-1, 1, num_bins + 1)[:-1]) - 1


# ---------------------------------------------------------------------------------------------------------------------
# Values


def test_reference_reproduces_openvlas_documented_behaviour():
    """Self-check of the reference against what action_tokenizer.py's docstrings state for 256 bins."""
    edges, centres = ovla_edges_and_centres(256)
    assert edges.shape == (256,) and centres.shape == (255,)  # "self._bin_centers has 255 values"
    digitized = ovla_digitize([-7.0, -1.0, 0.0, 0.999, 1.0, 7.0], 256)
    assert digitized.tolist() == [1, 1, 128, 255, 256, 256]  # "indices between [1, 256]"
    ids = ovla_token_ids([-1.0, 1.0], 256)
    assert ids.tolist() == [OPENVLA_VOCAB - 1, OPENVLA_VOCAB - 256]  # the last 256 ids of the vocabulary
    # "if i == 255, we subtract 1 from it so that it just becomes the index of the last bin center"
    np.testing.assert_array_equal(ovla_decode(ids, 256), [centres[0], centres[-1]])
    assert ovla_decode([OPENVLA_VOCAB - 255], 256)[0] == centres[-1]
    # NaN is not rejected: np.clip keeps it and np.digitize sorts it past the last edge -> the top token
    assert ovla_digitize([np.nan], 256).tolist() == [256]


def random_values(rng, n=4000):
    return np.concatenate([
        rng.uniform(-1.0, 1.0, n),
        rng.uniform(-3.0, 3.0, n // 4),  # outside [-1, 1]: OpenVLA clips first
        rng.normal(0.0, 0.5, n // 4).astype(np.float32).astype(np.float64),  # float32 inputs, as the model sees them
        [-1.0, 1.0, -1.0000001, 1.0000001, -1e9, 1e9, 0.0],
    ])


@pytest.mark.parametrize("num_bins", [32, 255, N_BINS])
def test_same_grid_same_bins_and_centres(num_bins):
    """hf_vla UniformBins(N) vs OpenVLA ActionTokenizer(n_bins=N): the same token for every value (values >= 1 take
    the last token on both sides) and the same decoded centre for every value and every token."""
    values = random_values(np.random.default_rng(num_bins))
    ours = UniformBins(num_bins)
    index = ours.encode(values)
    theirs, theirs_decoded = ovla_index(values, num_bins)
    np.testing.assert_array_equal(index, theirs)
    assert (index[values >= 1.0] == num_bins - 1).all()
    # decoded values: hf_vla's bin centres (float32) vs OpenVLA's (float64 midpoints of linspace edges)
    np.testing.assert_allclose(ours.centres(index), ovla_decode(ovla_token_ids(values, num_bins), num_bins), rtol=0,
                               atol=1e-7)  # fmt: skip
    np.testing.assert_array_equal(ours.centres(index), ours.centres(theirs_decoded))
    # and every token decodes alike: hf bin k == OpenVLA id vocab_size - (k + 1)
    k = np.arange(num_bins)
    np.testing.assert_allclose(ours.centres(k), ovla_decode(hf_index_to_ovla_id(k), num_bins), rtol=0, atol=1e-7)


@pytest.mark.parametrize("num_bins", [32, 255, N_BINS])
def test_values_on_or_just_below_a_bin_edge(num_bins):
    """OpenVLA compares each value with the edges (np.digitize, right=False): a value equal to an edge belongs to the
    interval above it, one a hair below it to the interval below; hf_vla compares with the same edges. Edges as OpenVLA
    makes them (np.linspace), their float64 neighbours below, and tiny negative numbers just under 0."""
    edges = np.linspace(-1.0, 1.0, num_bins)[1:-1]
    values = np.concatenate([edges, np.nextafter(edges, -np.inf), [-1e-20, -1e-17, 0.0]])
    np.testing.assert_array_equal(UniformBins(num_bins).encode(values), ovla_index(values, num_bins)[0])


def test_defaults_give_the_same_discretisation():
    """A researcher keeping both defaults: OpenVLA `n_action_bins` / ActionTokenizer `bins` = 256 (and LLaVA-VLA's
    proprioception, same tokenizer) vs hf_vla `num_action_tokens` = 256 (actions and state tokens)."""
    from hf_vla.models.bins import VLABinsConfig

    assert VLABinsConfig().num_action_tokens == N_BINS
    values = np.linspace(-1.0, 1.0, 100_001)
    theirs, _ = ovla_index(values, N_BINS)
    np.testing.assert_array_equal(UniformBins(VLABinsConfig().num_action_tokens).encode(values), theirs)
    sample = values[::97]
    state_tokens = state_to_text(sample, "{} ", N_BINS).removeprefix("[STATE] ").removesuffix(" [ACTION]").split()
    assert [int(t) for t in state_tokens] == theirs[::97].tolist()


def test_non_finite_actions_raise_where_openvla_clips_them():
    """Deliberate difference: OpenVLA's ActionTokenizer.__call__ turns +-inf into the end bins and NaN into its top
    token (a silent 'max' action); hf_vla refuses non-finite targets."""
    assert ovla_digitize([-np.inf, np.inf, np.nan], 256).tolist() == [1, 256, 256]
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="contain NaN or inf"):
            UniformBins(N_BINS).encode(np.array([0.1, bad]))


def test_state_numbers_match_starvla():
    """state_as_action_tokens=False (and the OFT / PI_v3 variants): bin numbers as StarVLA's state2str_transform
    writes them, including -1 below the range and 255 at or above 1."""
    state = np.array([-2.0, -1.0, -1.0 + 2 / 256, np.nextafter(-1.0 + 2 / 256, -2), -1e-20, 0.0, 0.5, 0.999, 1.0, 3.0])
    text = state_to_text(state)
    expected = " ".join(str(int(b)) for b in starvla_state_bins(state))
    assert text == f"[STATE] {expected} [ACTION]"
    assert expected.split()[0] == "-1" and expected.split()[-1] == "255"


# ---------------------------------------------------------------------------------------------------------------------
# The model: fixed replies decoded by predict_action; the state in the prompt


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from hf_vla.testing import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("openvla_ref") / "vlm", family="qwen2_5_vl")


def identity_stats(dim):
    ones, zeros = [1.0] * dim, [0.0] * dim
    return {"mean": zeros, "std": ones, "min": [-1.0] * dim, "max": ones, "q01": [-1.0] * dim, "q99": ones,
            "mode": ["identity"] * dim}  # fmt: skip


@pytest.fixture(scope="module")
def bins_model(vlm_dir):
    """A bins model on OpenVLA's default grid (256 tokens, 255 intervals), fp32, identity statistics (normalised =
    raw)."""
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="bins", action_dim=D, action_horizon=T, state_dim=S,
                                     num_action_tokens=N_BINS, dtype=torch.float32).eval()  # fmt: skip
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[28, 28])
    processor.set_norm_stats("sim", {"action": identity_stats(D), "state": identity_stats(S)})
    return model, processor


def prompt_inputs(processor, batch, state=None):
    rng = np.random.default_rng(1)
    views = [[rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(2)] for _ in range(batch)]
    state = np.zeros((batch, S)) if state is None else state
    return processor(images=views, text=["pick up the block"] * batch, state=state)


def fixed_reply(model, monkeypatch, replies):
    """model.vlm.generate returns prompt + these replies (rows padded with the end-of-turn id)."""
    eos = model.config.eos_token_id
    width = max(len(r) for r in replies)
    replies = torch.tensor([list(r) + [eos] * (width - len(r)) for r in replies])
    monkeypatch.setattr(model.vlm, "generate", lambda input_ids, **kw: torch.cat([input_ids, replies], dim=1))


def test_predict_action_decodes_fixed_replies_like_openvla(bins_model, monkeypatch):
    """Bin indices chosen from values (random, +-1, outside [-1, 1]) and spanning the first and last token; the reply
    is those action tokens (one row closed by <|im_end|>, one exactly T*D long). predict_action must give OpenVLA's
    predict_action decode of the corresponding OpenVLA ids."""
    model, processor = bins_model
    offset, eos = model.config.action_token_offset, model.config.eos_token_id
    values = np.array([[-1.0, -0.3, 0.01, 0.42, 1.0, 1.7], [-5.0, -0.999, 0.0, 0.2, 0.999, 0.5]])
    indices = ovla_index(values, N_BINS)[0]  # OpenVLA's bins of these values (its top token for values >= 1)
    replies = [[offset + int(k) for k in indices[0]] + [eos], [offset + int(k) for k in indices[1]]]
    fixed_reply(model, monkeypatch, replies)
    inputs = prompt_inputs(processor, 2)
    decoding = model.generate_actions(**inputs)
    assert decoding.valid.tolist() == [True, True]
    assert decoding.action_token_ids == indices.tolist()
    reference = np.stack([ovla_predict_action_decode(hf_index_to_ovla_id(row), T * D, N_BINS) for row in indices])
    predicted = model.predict_action(**inputs)
    assert predicted.dtype == torch.float32 and predicted.shape == (2, T, D)
    np.testing.assert_allclose(predicted.numpy(), reference.reshape(2, T, D), rtol=0, atol=1e-7)
    # time-major layout: token t * D + d is step t, dimension d
    np.testing.assert_allclose(predicted[0, 1, 0].item(), reference[0, D], rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", ["short", "empty", "above_range", "below_range", "too_long"])
def test_malformed_reply_is_flagged_not_decoded(bins_model, monkeypatch, case):
    """Deliberate difference: OpenVLA's predict_action decodes the last action_dim ids whatever they are (clipping
    out-of-range ones to the end bins); hf_vla flags the row (valid=False, NaN) and still decodes the good row."""
    model, processor = bins_model
    offset, eos, n = model.config.action_token_offset, model.config.eos_token_id, T * D
    good = [offset + k for k in (0, 7, 127, 128, 200, N_BINS - 1)]
    bad = {
        "short": good[:-1] + [eos],  # T*D - 1 action tokens
        "empty": [eos],
        "above_range": good[:-1] + [offset + N_BINS],  # one past the last action token
        "below_range": good[:-1] + [offset - 1],  # a text token
        "too_long": good + [offset + 3],  # T*D + 1 action tokens, no end of turn
    }[case]
    fixed_reply(model, monkeypatch, [good, bad])
    inputs = prompt_inputs(processor, 2)
    decoding = model.generate_actions(**inputs)
    assert decoding.valid.tolist() == [True, False]
    predicted = model.predict_action(**inputs)
    assert torch.isnan(predicted[1]).all()
    expected = ovla_predict_action_decode(hf_index_to_ovla_id(np.array(good) - offset), n, N_BINS)
    np.testing.assert_allclose(predicted[0].numpy().ravel(), expected, rtol=0, atol=1e-7)
    # what OpenVLA would have returned for the bad row: finite values, silently
    tail = [t for t in bad if t != eos][-n:]
    if len(tail) == n:
        theirs = ovla_predict_action_decode(hf_index_to_ovla_id(np.array(tail) - offset), n, N_BINS)
        assert np.isfinite(theirs).all()


def test_state_tokens_in_prompt_match_openvla_bins(bins_model):
    """LLaVA-VLA encode_robot_obs: the normalised state through OpenVLA's ActionTokenizer, i.e. the action tokens.
    hf_vla writes `<instruction> [STATE] <robot_action_k>... [ACTION]` in the user turn (config / state_to_text
    docstrings), k being OpenVLA's bin of each dimension (its top token for values >= 1)."""
    model, processor = bins_model
    edges = np.linspace(-1.0, 1.0, N_BINS)
    state = np.array([[-2.0, -1.0, edges[1], edges[100], -1e-20, 0.0, 0.63, 1.0, 4.0]])
    inputs = prompt_inputs(processor, 1, state=state)
    normalised = inputs["state"].numpy()[0]  # what the processor discretised (float32)
    theirs, _ = ovla_index(normalised, N_BINS)
    offset = model.config.action_token_offset
    written = [t - offset for t in inputs["input_ids"][0].tolist() if offset <= t < offset + N_BINS]
    assert written == theirs.tolist() and theirs[-2:].tolist() == [N_BINS - 1, N_BINS - 1]
    tokens = "".join(f"<robot_action_{k}>" for k in theirs)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert f"<|vision_end|>pick up the block [STATE] {tokens} [ACTION]<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # and the state's bins are the same bins the model uses for actions of equal value
    assert written == model.bins.encode(normalised).tolist()


def test_stacked_views_layout_matches_llava_vla(vlm_dir):
    """LLaVA-VLA compose_robot_input: static view on top, gripper view below, each resized to (S, S // 2) (PIL
    LANCZOS), one S x S image. hf_vla concat_views stacks the views after resizing each to image_size (PIL BICUBIC):
    with image_size = [S // 2, S] the layout is LLaVA-VLA's. Documented, not asserted: the resampling filter differs
    (BICUBIC vs LANCZOS), and with a square image_size (the default) hf_vla's stacked image is 2H x W, not square."""
    from PIL import Image

    model = AutoModelForVLA.from_vlm(vlm_dir, variant="bins", action_dim=D, action_horizon=T, num_action_tokens=N_BINS,
                                     concat_views=True, dtype=torch.float32)  # fmt: skip
    size = 56
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["static", "gripper"],
                                      image_size=[size // 2, size])  # fmt: skip
    rng = np.random.default_rng(3)
    static = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)  # CALVIN's static and gripper camera sizes
    gripper = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)

    def llava_vla_stack(resample):
        canvas = Image.new("RGB", (size, size))
        canvas.paste(Image.fromarray(static).resize((size, size // 2), resample), (0, 0))
        canvas.paste(Image.fromarray(gripper).resize((size, size // 2), resample), (0, size // 2))
        return np.asarray(canvas)

    (stacked,) = processor._check_views([[static, gripper]], 1)[0]
    assert stacked.shape == (size, size, 3)
    np.testing.assert_array_equal(stacked, llava_vla_stack(Image.BICUBIC))
    inputs = processor(images=[[static, gripper]], text=["go"])
    assert inputs["image_grid_thw"].tolist() == [[1, size // 14, size // 14]]
    assert processor.tokenizer.decode(inputs["input_ids"][0]).count("<|vision_start|>") == 1
