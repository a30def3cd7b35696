"""FAST and bins: actions as VLM tokens, causal-LM loss on the reply, constrained KV-cached decoding."""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, random_views
from test_published_configs import QWEN2_5_VL_3B, QWEN3_VL_4B
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from hf_vla import AutoModelForVLA, VLABinsForActionPrediction, VLAFASTForActionPrediction, VLAProcessor
from hf_vla.action_tokenizers import FASTTokenizer
from hf_vla.auto import VARIANTS
from hf_vla.testing import train_steps

T, D = 4, 3


def smooth_chunks(rng, n):
    t = np.linspace(0, 1, T)[None, :, None]
    return (rng.uniform(0.1, 0.6, (n, 1, D)) * np.sin(2 * np.pi * (t + rng.uniform(0, 1, (n, 1, D))))).astype(np.float32)


@pytest.fixture(scope="module")
def fast_tokenizer():
    return FASTTokenizer.fit(smooth_chunks(np.random.default_rng(0), 500), scale=10, vocab_size=64)


def make_token_model(vlm_dir, variant, fast_tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(action_dim=D, action_horizon=T, state_dim=2, **overrides)
    if variant == "fast":
        kwargs.update(action_tokenizer=fast_tokenizer, max_action_tokens=24)
    else:
        kwargs.setdefault("num_action_tokens", 32)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, **kwargs)
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    # identity statistics: normalised = raw, so targets can be given directly in [-1, 1]
    stats = {"action": {"mean": [0.0] * D, "std": [1.0] * D, "min": [-1.0] * D, "max": [1.0] * D,
                        "q01": [-1.0] * D, "q99": [1.0] * D, "mode": ["identity"] * D},
             "state": {"mean": [0.0] * 2, "std": [1.0] * 2, "min": [-1.0] * 2, "max": [1.0] * 2,
                       "q01": [-1.0] * 2, "q99": [1.0] * 2, "mode": ["identity"] * 2}}  # fmt: skip
    processor.set_norm_stats("sim", stats)
    return model, processor


@pytest.fixture(scope="module", params=[(f, v) for f in FAMILIES for v in ("fast", "bins")], ids=lambda p: f"{p[0]}-{p[1]}")
def token_model(request, tiny_vlm_dirs, fast_tokenizer):
    family, variant = request.param
    return (family, variant, *make_token_model(tiny_vlm_dirs[family], variant, fast_tokenizer))


def batch(processor, rng, n=2, actions=None):
    return processor(images=random_views(rng, n), text=["open the drawer", "close the door"][:n],
                     state=rng.uniform(-1, 1, (n, 2)), actions=actions)  # fmt: skip


def test_vocabulary_grows_like_starvla_action_models(tiny_vlm_dirs, token_model):
    family, variant, model, processor = token_model
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dirs[family])
    base_rows = base.get_input_embeddings().weight.shape[0]
    n = model.config.num_action_tokens
    assert model.get_input_embeddings().weight.shape[0] == base_rows + n
    assert model.config.action_token_offset == processor.tokenizer.convert_tokens_to_ids("<robot_action_0>")
    assert processor.tokenizer.convert_tokens_to_ids(f"<robot_action_{n - 1}>") == model.config.action_token_offset + n - 1
    for key, value in base.state_dict().items():
        if "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(model.vlm.state_dict()[key], value), key


def test_save_load_exact(token_model, tmp_path):
    _, variant, model, processor = token_model
    rng = np.random.default_rng(0)
    inputs = batch(processor, rng, actions=smooth_chunks(rng, 2))
    loss = model(**inputs).loss
    predicted = model.predict_action(**inputs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for auto in (AutoModelForVLA, AutoModel):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is type(model)
        assert torch.equal(loaded(**inputs).loss, loss)
        assert torch.allclose(loaded.predict_action(**inputs), predicted, equal_nan=True)
    if variant == "fast":
        assert (tmp_path / "action_tokenizer" / "processor_config.json").is_file()
        assert loaded.action_tokenizer(smooth_chunks(rng, 3)) is not None


@pytest.mark.parametrize("variant", ["fast", "bins"])
def test_decoding_ignores_the_backbones_published_generation_settings(instruct_like_vlm, fast_tokenizer, variant,
                                                                      tmp_path):  # fmt: skip
    model, processor = make_token_model(instruct_like_vlm, variant, fast_tokenizer)
    inputs = batch(processor, np.random.default_rng(0))
    tokens = model.generate_actions(**inputs).action_token_ids
    model.save_pretrained(tmp_path)
    assert AutoModelForVLA.from_pretrained(tmp_path).generate_actions(**inputs).action_token_ids == tokens


def test_overfit_then_decode_through_the_kv_cache(tiny_vlm_dirs, fast_tokenizer):
    """After overfitting two samples, constrained greedy decoding reproduces their chunks: FAST within the
    quantisation bound, bins as bin centres. With and without the KV cache the tokens are identical."""
    rng = np.random.default_rng(4)
    for family, variant in [(f, v) for f in FAMILIES for v in ("fast", "bins")]:
        model, processor = make_token_model(tiny_vlm_dirs[family], variant, fast_tokenizer, seed=1)
        targets = smooth_chunks(rng, 2)
        inputs = batch(processor, rng, actions=targets)
        losses = train_steps(model, inputs, steps=120, lr=3e-3)
        assert losses[-1] < losses[0] / 10, (variant, losses[0], losses[-1])
        cached = model.generate_actions(**inputs)
        uncached = model.generate_actions(**inputs, use_cache=False)
        assert cached.action_token_ids == uncached.action_token_ids
        assert cached.valid.all()
        # a callback predicting mid-training: a checkpointed backbone drops its KV cache in training mode
        model.gradient_checkpointing_enable()
        model.train()
        assert model.generate_actions(**inputs).action_token_ids == cached.action_token_ids
        model.gradient_checkpointing_disable()
        model.eval()
        assert model.action_head is None  # the head is the vocabulary
        if variant == "fast":
            assert cached.action_token_ids == fast_tokenizer(targets)
            bound = np.sqrt(T) * 0.5 / fast_tokenizer.scale
            error = np.linalg.norm(cached.actions.numpy() - targets, axis=1)
            assert (error <= bound + 1e-5).all()
        else:
            expected = model.bins.centres(model.bins.encode(targets))
            np.testing.assert_allclose(cached.actions.numpy(), expected, atol=1e-6)


def test_undecodable_sequences_are_flagged(token_model):
    _, variant, model, _ = token_model
    good = model.encode_actions(smooth_chunks(np.random.default_rng(0), 1))[0]
    actions, valid = model.decode_action_tokens([good, good[:-1] if variant == "bins" else good[:1], []])
    assert valid.tolist() == [True, False, False]
    assert np.isfinite(actions[0]).all() and np.isnan(actions[1:]).all()


def test_fast_decoding_chooses_only_ids_its_tokenizer_can_decode(tiny_vlm_dirs, fast_tokenizer, monkeypatch):
    """A 64-token FAST tokenizer on a model with 128 action rows (as a 1024-token BPE on a 2048-row -Action model):
    ids past the tokenizer's vocabulary would only ever decode to a NaN chunk."""
    from hf_vla.models import token_actions

    model, processor = make_token_model(tiny_vlm_dirs["qwen2_5_vl"], "fast", fast_tokenizer, num_action_tokens=128)
    allowed, allow_only = [], token_actions.AllowOnly
    monkeypatch.setattr(token_actions, "AllowOnly", lambda ids: allowed.append(ids) or allow_only(ids))
    model.generate_actions(**batch(processor, np.random.default_rng(0)))
    offset, size = model.config.action_token_offset, fast_tokenizer.bpe.get_vocab_size(with_added_tokens=True)
    assert model.config.num_action_tokens == 128 and size == 64
    assert allowed[0].tolist() == [*range(offset, offset + size), model.config.eos_token_id]


def test_loss_depends_on_image_and_instruction(token_model):
    _, _, model, processor = token_model
    rng = np.random.default_rng(2)
    views, other = random_views(rng, 1), random_views(rng, 1)
    target, state = smooth_chunks(rng, 1), np.zeros((1, 2))

    def loss(images, text):
        return model(**processor(images=images, text=text, state=state, actions=target)).loss.item()

    base = loss(views, ["open the drawer"])
    assert abs(base - loss(other, ["open the drawer"])) > 1e-6
    assert abs(base - loss(views, ["close the door"])) > 1e-6


def test_action_mask_leaves_invalid_entries_out_of_the_bins_loss(token_model, monkeypatch):
    from hf_vla.models.fast import modeling_fast
    from hf_vla.models.token_actions import IGNORE_INDEX

    _, variant, model, processor = token_model
    rng = np.random.default_rng(5)
    views, state = random_views(rng, 1), np.zeros((1, 2))
    target = smooth_chunks(rng, 1)
    valid = np.zeros((1, T, D), np.float32)
    valid[:, 0, :-1] = 1  # step 0 only (an episode's end), without its last dimension (padded by a mixture)
    warnings = []
    monkeypatch.setattr(modeling_fast.logger, "warning_once", warnings.append)

    def scored(mask):
        inputs = processor(images=views, text=["open the drawer"], state=state, actions=target, action_mask=mask)
        _, _, labels = model.append_targets(inputs["input_ids"], inputs["attention_mask"], inputs["actions"],
                                            inputs.get("action_mask"))  # fmt: skip
        assert np.isfinite(model(**inputs).loss.item())  # forward takes the mask too
        return labels[labels != IGNORE_INDEX].tolist()

    everything = scored(None)
    assert scored(np.ones((1, T), np.float32)) == everything
    offset, eos = model.config.action_token_offset, model.config.eos_token_id
    if variant == "bins":  # one token per value: exactly the valid values and the end of turn are scored
        values = model.encode_actions(processor(images=views, text=["x"], state=state, actions=target)["actions"].numpy())
        assert scored(valid) == [offset + k for k in values[0][: D - 1]] + [eos]
        assert not warnings
    else:  # a FAST token codes the whole chunk: nothing can be left out, and the user is told so
        assert scored(valid) == everything and warnings and "cannot be left out of the loss" in warnings[0]


def test_a_state_the_model_cannot_read_is_reported(tiny_vlm_dirs, fast_tokenizer, monkeypatch):
    from hf_vla import modeling_vla

    warnings = []
    monkeypatch.setattr(modeling_vla.logger, "warning_once", warnings.append)
    fast, _ = make_token_model(tiny_vlm_dirs["qwen2_5_vl"], "fast", fast_tokenizer)  # state_dim 2, not in the prompt
    assert not fast.reads_state and len(warnings) == 1 and "state_dim=2, but this model does not read" in warnings[0]
    warnings.clear()
    prompted, _ = make_token_model(tiny_vlm_dirs["qwen2_5_vl"], "fast", fast_tokenizer, state_in_prompt=True)
    bins, _ = make_token_model(tiny_vlm_dirs["qwen2_5_vl"], "bins", None)
    assert prompted.reads_state and bins.reads_state and not warnings


def test_bins_prompt_carries_state_tokens_and_one_stacked_image(tiny_vlm_dirs, fast_tokenizer, tmp_path):
    model, processor = make_token_model(tiny_vlm_dirs["qwen2_5_vl"], "bins", fast_tokenizer, concat_views=True)
    inputs = processor(images=random_views(np.random.default_rng(0), 1), text=["go"], state=[[-1.0, 1.0]])
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    # the state uses the actions' 32 tokens (OpenVLA's grid: 31 intervals, the last token for values at 1)
    assert model.config.num_action_tokens == 32
    assert "[STATE] <robot_action_0><robot_action_31> [ACTION]" in text
    offset = model.config.action_token_offset
    assert [offset, offset + 31] == [t for t in inputs["input_ids"][0].tolist() if offset <= t < offset + 32]
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).state_bins == 32
    assert text.count("<|vision_start|>") == 1 and inputs["image_grid_thw"].tolist() == [[1, 8, 4]]


def test_bad_inputs(tiny_vlm_dirs, fast_tokenizer):
    vlm = tiny_vlm_dirs["qwen2_5_vl"]
    model = AutoModelForVLA.from_vlm(vlm, variant="fast", action_dim=D, action_horizon=T, num_action_tokens=64)
    processor = VLAProcessor.from_vlm(vlm, model.config, image_size=[56, 56])
    inputs = processor(images=random_views(np.random.default_rng(0), 1, cameras=1), text=["go"])
    with pytest.raises(ValueError, match="action_tokenizer: this FAST model has no FAST tokenizer"):
        model(**inputs, actions=torch.zeros(1, T, D))
    with pytest.raises(ValueError, match=r"action_tokenizer: its vocabulary \(64\) exceeds the model's num_action_tokens \(32\)"):
        AutoModelForVLA.from_vlm(vlm, variant="fast", action_tokenizer=fast_tokenizer, num_action_tokens=32,
                                 action_dim=D, action_horizon=T)  # fmt: skip
    with pytest.raises(ValueError, match=r"action_tokenizer.action_dim: expected 5 \(the model's\), got 3"):
        AutoModelForVLA.from_vlm(vlm, variant="fast", action_tokenizer=fast_tokenizer, action_dim=5, action_horizon=T)
    model.set_action_tokenizer(fast_tokenizer)
    with pytest.raises(ValueError, match=r"actions: expected shape \[1, 4, 3\] .*, got \[1, 4, 2\]"):
        model(**inputs, actions=torch.zeros(1, T, 2))
    with pytest.raises(ValueError, match=r"actions: expected shape \[1, 4, 3\] .*, got \[2, 4, 3\]"):
        model(**inputs, actions=torch.zeros(2, T, D))
    bins = AutoModelForVLA.from_vlm(vlm, variant="bins", action_dim=D, action_horizon=T, num_action_tokens=32)
    with pytest.raises(ValueError, match="actions: contain NaN or inf"):
        bins(**inputs, actions=torch.full((1, T, D), float("nan")))


@pytest.mark.parametrize("vlm_config", [QWEN2_5_VL_3B, QWEN3_VL_4B], ids=["qwen2.5-vl-3b", "qwen3-vl-4b"])
@pytest.mark.parametrize("variant", ["fast", "bins"])
def test_token_variants_add_no_parameters_at_published_config(vlm_config, variant):
    """StarVLA's QwenFast has no head parameters: the action vocabulary is 2048 extra embedding / lm_head rows of the
    -Action backbone (base rows 151,936 + 2,048 = 153,984)."""
    action_vlm = vlm_config.to_dict()
    action_vlm["text_config"]["vocab_size"] = 151936 + 2048
    config = AutoConfig.for_model(f"vla_{variant}", vlm_config=action_vlm, action_dim=7, num_action_tokens=2048)
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)
        backbone = AutoModelForImageTextToText.from_config(model.config.vlm_config)
    assert isinstance(model, VLAFASTForActionPrediction if variant == "fast" else VLABinsForActionPrediction)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in backbone.parameters())
    assert model.vlm.lm_head.weight.shape[0] == 153984


@pytest.mark.parametrize("variant", ["fast", "bins"])
def test_action_tokens_resize_a_meta_device_backbone(tiny_vlm_dirs, variant):
    """Full-size architecture checks and benchmarks build on the meta device: adding the action rows must not need
    the embedding values that mean initialisation reads."""
    model_class = VARIANTS[f"vla_{variant}"][1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_dirs["qwen3_vl"])
    kwargs = model_class.config_kwargs_from_tokenizer(tokenizer, {})
    with torch.device("meta"):
        backbone = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_vlm_dirs["qwen3_vl"]))
    rows = backbone.get_input_embeddings().weight.shape[0]
    model_class.adapt_backbone(backbone, tokenizer, kwargs)
    assert backbone.get_input_embeddings().weight.shape[0] == rows + model_class.config_class.num_action_tokens


def test_fast_fetches_its_tokenizer_with_the_weights_hub_options(fast_tokenizer, tmp_path, monkeypatch):
    """A hub FAST release: `action_tokenizer/` comes through the caller's cache_dir, token and revision (offline with
    a custom cache, the default cache would not have it)."""
    import huggingface_hub

    from hf_vla.models.token_actions import VLATokenActionModel

    fast_tokenizer.save_pretrained(tmp_path / "snapshot" / "sub" / "action_tokenizer")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    class Loaded:
        def set_action_tokenizer(self, tokenizer):
            self.tokenizer = tokenizer

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(VLATokenActionModel, "from_pretrained", classmethod(lambda cls, *args, **kwargs: Loaded()))
    model = VLAFASTForActionPrediction.from_pretrained("org/fast-vla", cache_dir="/c", token="t", revision="r",
                                                       local_files_only=True, subfolder="sub", dtype=torch.float32)  # fmt: skip
    assert calls == [("org/fast-vla", {"allow_patterns": ["sub/action_tokenizer/*"], "cache_dir": "/c", "token": "t",
                                       "revision": "r", "local_files_only": True})]  # fmt: skip
    assert model.tokenizer.vocab_size == fast_tokenizer.vocab_size
