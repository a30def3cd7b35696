"""The HF-native spine on both backbones: Auto* dispatch, exact save/load, bf16, overfitting, sensitivity, policy."""

import copy

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_oft, random_views
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoProcessor

from hf_vla import AutoModelForVLA, VLAOFTConfig, VLAOFTForActionPrediction, VLAPolicy, VLAProcessor
from hf_vla.testing import train_steps


@pytest.fixture(scope="module", params=FAMILIES)
def oft(request, tiny_vlm_dirs):
    model, processor = make_oft(tiny_vlm_dirs[request.param])
    return request.param, model, processor


def sample_inputs(processor, batch=2, seed=0, with_actions=False):
    rng = np.random.default_rng(seed)
    kwargs = dict(
        images=random_views(rng, batch),
        text=["put the carrot on the plate", "open the drawer"][:batch] + ["push the button"] * max(0, batch - 2),
        state=rng.normal(size=(batch, processor.state_dim)),
    )
    if with_actions:
        kwargs["actions"] = rng.normal(size=(batch, processor.action_horizon, processor.action_dim))
    return processor(**kwargs, return_tensors="pt")


def test_save_load_is_exact_and_dispatches(oft, tmp_path):
    family, model, processor = oft
    inputs = sample_inputs(processor)
    expected = model.predict_action(**inputs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    assert type(AutoConfig.from_pretrained(tmp_path)) is VLAOFTConfig
    assert type(AutoProcessor.from_pretrained(tmp_path)) is VLAProcessor
    for auto in (AutoModelForVLA, AutoModel):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is VLAOFTForActionPrediction
        assert loaded.config.vlm_config.model_type == family
        assert torch.equal(loaded.predict_action(**inputs), expected)

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    head_keys = {k for k in model.state_dict() if k.startswith("action_head.")}
    assert head_keys and head_keys <= saved
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in head_keys:
            assert torch.equal(f.get_tensor(key), model.state_dict()[key])


def test_processor_round_trip_is_exact(oft, tmp_path):
    _, _, processor = oft
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.norm_stats == processor.norm_stats
    for field in ("camera_names", "image_size", "action_dim", "action_horizon", "state_dim", "state_in_prompt",
                  "prompt_template", "action_query_token", "action_query_suffix", "backbone"):  # fmt: skip
        assert getattr(loaded, field) == getattr(processor, field), field
    a, b = sample_inputs(processor, with_actions=True), sample_inputs(loaded, with_actions=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


SETTINGS = ("camera_names", "image_size", "action_dim", "action_horizon", "state_dim", "state_in_prompt",
            "prompt_template", "action_query_token", "action_query_suffix", "state_token_template", "state_bins",
            "concat_views", "backbone", "chat_template", "norm_stats")


def test_every_processor_setting_round_trips_and_older_configs_get_the_defaults(tiny_vlm_dirs, tmp_path):
    import json

    from transformers import AutoImageProcessor, AutoTokenizer

    from hf_vla.normalization import compute_stats

    vlm = tiny_vlm_dirs["qwen3_vl"]
    rng = np.random.default_rng(0)
    processor = VLAProcessor(
        AutoImageProcessor.from_pretrained(vlm), AutoTokenizer.from_pretrained(vlm),
        camera_names=["front", "wrist", "top"], image_size=[64, 96], action_dim=5, action_horizon=3, state_dim=4,
        state_in_prompt=True, prompt_template="Task: {instruction}!", action_query_token="<|fim_pad|>",
        action_query_suffix=" then {horizon}: {queries}", state_bins=32, concat_views=True, backbone="qwen3_vl",
    )  # fmt: skip
    actions = rng.normal(size=(64, 5))
    actions[:, 4] = 2.5  # a constant dimension
    stats = {"action": compute_stats(actions, ["q99", "min_max", "mean_std", "binary", "identity"]),
             "state": {**compute_stats(rng.normal(size=(64, 4)), ["identity", "q99", "binary", "mean_std"]),
                       "embodiment_dim": 3},
             "action_mode": ["rel", "abs", "delta", "abs", "abs"], "num_transitions": 64}  # fmt: skip
    processor.set_norm_stats("arm", stats)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    for name in SETTINGS:
        assert getattr(loaded, name) == getattr(processor, name), name
    sample = dict(images=random_views(rng, 2, cameras=3), text=["open", "close the door"],
                  state=rng.normal(size=(2, 3)), actions=rng.normal(size=(2, 3, 5)))
    a, b = processor(**sample), loaded(**sample)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert a["image_grid_thw"].tolist() == [[1, 12, 6]] * 2  # three 64 × 96 views stacked: one 192 × 96 image
    chunk = rng.uniform(-1, 1, (2, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(loaded.decode_actions(chunk, state=sample["state"]),
                                  processor.decode_actions(chunk, state=sample["state"]))  # fmt: skip

    # a processor_config.json from before state_bins, concat_views, state_token_template and the OFT query settings
    config = json.loads((tmp_path / "processor_config.json").read_text())
    newer = ("state_bins", "concat_views", "state_token_template", "action_query_token", "action_query_suffix")
    (tmp_path / "processor_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in newer}))
    older = AutoProcessor.from_pretrained(tmp_path)
    assert [getattr(older, name) for name in newer] == [256, False, None, None, None]
    for name in set(SETTINGS) - set(newer):
        assert getattr(older, name) == getattr(processor, name), name


def test_bf16_loading(oft, tmp_path):
    _, model, processor = oft
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    policy = VLAPolicy.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    rng = np.random.default_rng(1)
    obs = {
        "images": {"primary": rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8),
                   "wrist": rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)},
        "instruction": ["open the drawer", "close the door"],
        "state": rng.normal(size=(2, processor.state_dim)),
    }  # fmt: skip
    low = policy.predict(obs)
    full = VLAPolicy(model, processor).predict(obs)
    assert low.dtype == np.float32 and low.shape == full.shape == (2, 4, 7)
    assert np.isfinite(low).all()
    scale = np.abs(full).max()
    assert np.abs(low - full).max() < 0.1 * scale + 1e-3


def test_policy_loads_weights_and_statistics_from_the_same_place(oft, tmp_path):
    # a release whose folders differ (a subfolder, or a revision) must not pair its weights with other statistics
    _, model, processor = oft
    shifted = copy.deepcopy(processor)
    shifted.set_norm_stats("bridge", {**processor.norm_stats["bridge"], "action": {
        **processor.norm_stats["bridge"]["action"], "mean": [100.0] * 7, "q01": [99.0] * 7, "q99": [101.0] * 7}})
    processor.save_pretrained(tmp_path)  # the top level: other statistics
    model.save_pretrained(tmp_path / "v2")
    shifted.save_pretrained(tmp_path / "v2")
    policy = VLAPolicy.from_pretrained(str(tmp_path), subfolder="v2")
    assert policy.processor.norm_stats == shifted.norm_stats


def test_resized_vocabulary_reaches_the_lm_head_and_survives_save_and_load(tiny_vlm_dirs, tmp_path):
    model, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + 8)  # e.g. after adding tokens to the processor's tokenizer
    assert model.vlm.lm_head.weight.shape[0] == rows + 8
    assert model.config.vlm_config.get_text_config().vocab_size == rows + 8
    model.save_pretrained(tmp_path)
    loaded = AutoModelForVLA.from_pretrained(tmp_path)
    inputs = sample_inputs(processor)
    assert torch.equal(loaded.predict_action(**inputs), model.predict_action(**inputs))


def test_overfitting_a_batch_distinguishes_images_and_instructions(tiny_vlm_dirs):
    """Four samples: two images × two instructions, each with its own target chunk. Driving the L1 loss down 10×
    is only possible if both the image and the instruction reach the action head."""
    model, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"], state_dim=0, seed=1)
    rng = np.random.default_rng(3)
    image_a, image_b = random_views(rng, 2)
    targets = rng.uniform(-1, 1, size=(4, processor.action_horizon, processor.action_dim))
    raw_targets = processor.decode_actions(targets, unnorm_key="bridge")
    batch = processor(
        images=[image_a, image_b, image_a, image_b],
        text=["open the drawer", "open the drawer", "close the door", "close the door"],
        actions=raw_targets,
        return_tensors="pt",
    )
    losses = train_steps(model, batch, steps=200, lr=2e-3)  # bicubic-resized noise views: ~0.08 at 150, ~0.03 at 200
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    predicted = model.predict_action(**{k: v for k, v in batch.items() if k != "actions"})
    assert torch.allclose(predicted, batch["actions"], atol=0.3)


def test_backbone_builds_no_kv_cache_unless_asked(oft):
    """The backbone config's use_cache=True would build, then drop, a full KV cache in every training forward."""
    _, model, processor = oft
    inputs = sample_inputs(processor)
    assert model.encode(**inputs).past_key_values is None
    vlm_inputs = {k: v for k, v in inputs.items() if k != "state"}
    cached = model.backbone.encode(model.vlm, use_cache=True, **vlm_inputs)  # what a caller that wants it asks
    assert cached.past_key_values is not None
    torch.testing.assert_close(model.encode(**inputs).last_hidden_state, cached.last_hidden_state)


def test_untrained_predictions_depend_on_image_and_instruction(oft):
    _, model, processor = oft
    rng = np.random.default_rng(0)
    views = random_views(rng, 1)
    other_views = random_views(rng, 1)
    state = np.zeros((1, processor.state_dim))
    base = model.predict_action(**processor(images=views, text=["open the drawer"], state=state))
    new_image = model.predict_action(**processor(images=other_views, text=["open the drawer"], state=state))
    new_text = model.predict_action(**processor(images=views, text=["close the door"], state=state))
    assert (base - new_image).abs().max() > 1e-5
    assert (base - new_text).abs().max() > 1e-5


def test_batched_and_unbatched_policy_match_the_manual_pipeline(oft):
    _, model, processor = oft
    policy = VLAPolicy(model, processor)
    rng = np.random.default_rng(5)
    primary = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    state = rng.normal(size=(3, processor.state_dim))
    text = ["open the drawer", "close the door", "push the button"]
    batched = policy.predict({"images": {"primary": primary, "wrist": wrist}, "instruction": text, "state": state})
    manual = processor.decode_actions(
        model.predict_action(**processor(images=[[primary[i], wrist[i]] for i in range(3)], text=text, state=state)),
        unnorm_key="bridge",
    )
    assert batched.shape == (3, 4, 7) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, manual, rtol=1e-5, atol=1e-6)
    single = policy.predict({"images": {"primary": primary[1], "wrist": wrist[1]}, "prompt": text[1], "state": state[1]})
    assert single.shape == (4, 7)
    np.testing.assert_allclose(single, batched[1], rtol=1e-4, atol=1e-5)
    # numpy strings, as the server takes them: one per sample, or one (0-d) for the batch
    for instruction in (np.asarray(text), np.asarray(text[1])):
        again = policy.predict({"images": {"primary": primary, "wrist": wrist}, "instruction": instruction,
                                "state": state})  # fmt: skip
        expected = batched if instruction.ndim else policy.predict(
            {"images": {"primary": primary, "wrist": wrist}, "instruction": text[1], "state": state})
        np.testing.assert_array_equal(again, expected)
    with pytest.raises(ValueError, match=r"^instruction: expected a string or 3 string\(s\), got array\(\[\[1"):
        policy.predict({"images": {"primary": primary, "wrist": wrist}, "instruction": np.ones((3, 1)), "state": state})
    actions, normalized = policy.predict({"images": {"primary": primary[1], "wrist": wrist[1]}, "prompt": text[1],
                                          "state": state[1]}, return_normalized=True)  # fmt: skip
    assert normalized.shape == (4, 7) and normalized.dtype == np.float32
    np.testing.assert_allclose(actions, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(processor.decode_actions(normalized, unnorm_key="bridge"), actions, rtol=1e-5, atol=1e-6)


def test_design_snippet_runs_as_written(tiny_vlm_dirs, tmp_path):
    """shared/design.md §1 with a local directory in place of the hub id."""
    from PIL import Image

    vlm = tiny_vlm_dirs["qwen3_vl"]
    model = AutoModelForVLA.from_vlm(vlm, variant="oft", action_dim=7, action_horizon=16, state_dim=7)
    processor = VLAProcessor.from_vlm(vlm, model.config, camera_names=["primary", "wrist"])
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("bridge", rng.normal(size=(64, 7)), rng.normal(size=(64, 7)))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    path = str(tmp_path)

    primary = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    wrist = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    state = rng.normal(size=7)
    chunks = rng.normal(size=(1, 16, 7))

    model = AutoModelForVLA.from_pretrained(path, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=[[primary, wrist]], text=["put the carrot on the plate"], state=[state], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    normalized = model.predict_action(**inputs)
    actions = processor.decode_actions(normalized, unnorm_key="bridge")
    assert normalized.shape == (1, 16, 7) and actions.shape == (1, 16, 7) and actions.dtype == np.float32

    policy = VLAPolicy.from_pretrained(path)
    img = np.asarray(primary)
    actions = policy.predict({"images": {"primary": img, "wrist": np.asarray(wrist)}, "instruction": "...", "state": state})
    assert actions.shape == (16, 7)

    batch = processor(images=[[primary, wrist]], text=["go"], state=[state], actions=chunks, return_tensors="pt")
    model = AutoModelForVLA.from_pretrained(path)
    loss = model(**batch).loss
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_for_model_and_meta_from_config(tiny_vlm_dirs):
    vlm_config = AutoConfig.from_pretrained(tiny_vlm_dirs["qwen2_5_vl"])
    config = AutoConfig.for_model("vla_oft", vlm_config=vlm_config.to_dict(), action_dim=5)
    assert type(config) is VLAOFTConfig and config.vlm_config.model_type == "qwen2_5_vl"
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)
    assert type(model) is VLAOFTForActionPrediction
    assert model.action_head.fc2.weight.shape == (5, 128)


def test_from_vlm_loads_backbone_weights_and_initialises_the_head(tiny_vlm_dirs):
    from transformers import AutoModelForImageTextToText

    vlm_dir = tiny_vlm_dirs["qwen2_5_vl"]
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="oft", action_dim=3, action_horizon=2)
    reference = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.vlm.state_dict()[key], value), key
    head = dict(model.action_head.named_parameters())
    assert all(torch.isfinite(p).all() for p in head.values())
    assert head["fc1.weight"].std().item() == pytest.approx(model.config.initializer_range, rel=0.2)
    assert torch.equal(head["layer_norm1.weight"], torch.ones_like(head["layer_norm1.weight"]))
    assert model.config.base_vlm == vlm_dir
    with pytest.raises(ValueError, match="unknown variant 'nope'.*oft"):
        AutoModelForVLA.from_vlm(vlm_dir, variant="nope")


def test_from_vlm_gives_the_whole_model_one_dtype_that_survives_save_and_load(instruct_like_vlm, tmp_path):
    inputs = sample_inputs(make_oft(instruct_like_vlm)[1])
    for dtype, expected in ((None, torch.float32), ("auto", torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        model = AutoModelForVLA.from_vlm(instruct_like_vlm, variant="oft", action_dim=7, action_horizon=4,
                                         state_dim=6, dtype=dtype)  # fmt: skip
        assert {p.dtype for p in model.parameters()} == {expected}, dtype
        model.save_pretrained(tmp_path / str(dtype))
        loaded = AutoModelForVLA.from_pretrained(tmp_path / str(dtype))
        assert {p.dtype for p in loaded.parameters()} == {expected}, dtype
        assert torch.equal(loaded.predict_action(**inputs), model.predict_action(**inputs)), dtype


def tokenise_expanded(processor, prompts, image_grid_thw):
    """The slow reference: every image placeholder expanded in the text, then the tokenizer's own padding."""
    counts = [int(t * h * w) // processor.image_processor.merge_size**2 for t, h, w in image_grid_thw.tolist()]
    expanded = processor._expand_image_tokens(prompts, counts)
    return processor.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")


@pytest.mark.parametrize("vocabulary", ["tiny", "qwen"])
def test_prompt_tokens_equal_tokenising_the_expanded_text(tiny_vlm_dirs, vocabulary):
    # the processor tokenises one placeholder per image and repeats its id; the result must be the tokenizer's own
    from hf_vla.testing import build_qwen_tokenizer

    _, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    if vocabulary == "qwen":
        processor.tokenizer = build_qwen_tokenizer("qwen2_5_vl")
    rng = np.random.default_rng(4)
    texts = ["pick up the cup", "open the drawer  ", "déplacer le bol\tà gauche", "x\n y 12345 ?!", "", "a" * 300]
    for concat in (False, True):
        processor.concat_views = concat
        for batch in (1, 2, 3):
            prompts = texts[:batch] if batch < 3 else texts[3:]
            state = rng.normal(size=(len(prompts), processor.state_dim))
            sample = processor(images=random_views(rng, len(prompts)), text=prompts, state=state)
            normalized = sample["state"].numpy()
            built = [processor.build_prompt(processor._instruction_text(text, normalized[b], b), 1 if concat else 2)
                     for b, text in enumerate(prompts)]  # fmt: skip
            reference = tokenise_expanded(processor, built, sample["image_grid_thw"])
            for name in ("input_ids", "attention_mask"):
                assert torch.equal(sample[name], reference[name]), (concat, batch, name)
            image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            assert torch.equal(sample["mm_token_type_ids"], (reference["input_ids"] == image_id).int())
    processor.tokenizer = copy.deepcopy(processor.tokenizer)
    processor.tokenizer.pad_token = None
    processor._prompt_cache.clear()
    with pytest.raises(ValueError, match="need a pad token"):
        processor(images=random_views(rng, 2), text=["a", "a much longer instruction"], state=np.zeros((2, 6)))


def test_repeated_prompts_are_tokenised_once_and_stay_independent(tiny_vlm_dirs, monkeypatch):
    _, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    rng = np.random.default_rng(0)
    views = random_views(rng, 2)
    first = processor(images=views, text=["pick up the cup", "open the drawer"], state=np.zeros((2, 6)))
    first["input_ids"][0, -1] = -7  # callers may modify what they get back
    calls = []
    tokenizer_call = type(processor.tokenizer).__call__
    monkeypatch.setattr(type(processor.tokenizer), "__call__",
                        lambda self, *a, **k: calls.append(a) or tokenizer_call(self, *a, **k))  # fmt: skip
    again = processor(images=views, text=["pick up the cup", "open the drawer"], state=np.zeros((2, 6)))
    other = processor(images=views, text=["pick up the cup", "close the drawer"], state=np.zeros((2, 6)))
    monkeypatch.undo()
    assert len(calls) == 1  # only the new prompt pair reached the tokenizer
    fresh = tokenise_expanded(processor, list(calls[0][0]), other["image_grid_thw"])
    torch.testing.assert_close(other["input_ids"], fresh["input_ids"])
    assert again["input_ids"][0, -1] != -7 and not torch.equal(again["input_ids"], other["input_ids"])


def test_prompt_cache_follows_the_state_text_and_the_template(tiny_vlm_dirs):
    # OFT writes the state into the prompt: the cache must key on it, not only on the instruction
    _, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    _, uncached = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    rng = np.random.default_rng(2)
    views = random_views(rng, 1)
    low, high = np.full((1, 6), -5.0), np.full((1, 6), 5.0)
    for state in (low, high, low):
        cached = processor(images=views, text="open the drawer", state=state)["input_ids"]
        uncached._prompt_cache.clear()
        torch.testing.assert_close(cached, uncached(images=views, text="open the drawer", state=state)["input_ids"])
    assert not torch.equal(processor(images=views, text="open the drawer", state=low)["input_ids"],
                           processor(images=views, text="open the drawer", state=high)["input_ids"])  # fmt: skip
    # another tokenizer attached (here a counting stand-in of the same length and pad token) is asked again
    class CountingTokenizer:
        def __init__(self, tokenizer):
            self.tokenizer, self.calls = tokenizer, 0

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __len__(self):
            return len(self.tokenizer)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.tokenizer(*args, **kwargs)

    original = processor.tokenizer
    processor.tokenizer = CountingTokenizer(original)
    processor(images=views, text="open the drawer", state=low)
    assert processor.tokenizer.calls == 1
    processor.tokenizer = original
    processor.prompt_template = "Task: {instruction}"
    uncached.prompt_template = "Task: {instruction}"
    uncached._prompt_cache.clear()
    torch.testing.assert_close(processor(images=views, text="open the drawer", state=low)["input_ids"],
                               uncached(images=views, text="open the drawer", state=low)["input_ids"])  # fmt: skip
    # another image size gives other image-token runs for the same text and state
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    processor.image_size = uncached.image_size = [2 * factor, 3 * factor]
    uncached._prompt_cache.clear()
    resized = processor(images=views, text="open the drawer", state=low)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (resized["input_ids"] == image_id).sum() == 2 * 6  # two views of 2 × 3 merged tokens
    torch.testing.assert_close(resized["input_ids"],
                               uncached(images=views, text="open the drawer", state=low)["input_ids"])  # fmt: skip
    with pytest.raises(ValueError, match=r"text\[0\]: expected str, got list"):
        processor(images=views, text=[["open the drawer"]], state=low)


def test_policy_reuses_its_pixel_buffer_without_mixing_observations(oft):
    _, model, processor = oft
    processor = copy.deepcopy(processor)
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    processor.image_size = [2 * factor, 2 * factor]  # a size Qwen keeps: the batched image path, which fills buffers
    policy = VLAPolicy(model, processor)
    rng = np.random.default_rng(9)
    size = processor.image_size
    observations = [
        {"images": {cam: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for cam in ("primary", "wrist")},
         "instruction": "open the drawer", "state": rng.normal(size=processor.state_dim)}
        for _ in range(3)
    ]  # fmt: skip
    buffers = []
    for obs in observations:
        actions = policy.predict(obs)
        buffers.append(policy._pixel_buffers[-1].data_ptr())
        fresh = processor(images=[[obs["images"]["primary"], obs["images"]["wrist"]]], text=[obs["instruction"]],
                          state=obs["state"][None])  # fmt: skip
        expected = processor.decode_actions(model.predict_action(**fresh))[0]
        np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)
    assert len(set(buffers)) == 1  # one buffer, rewritten at each step
    # a buffer handed to the processor receives exactly what a fresh call allocates
    views = [[observations[0]["images"]["primary"], observations[0]["images"]["wrist"]]]
    buffer = torch.full_like(policy._pixel_buffers[-1], float("nan"))
    written = processor(images=views, text="x", state=np.zeros((1, 6)), pixel_buffer=buffer)["pixel_values"]
    assert written.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(written, processor(images=views, text="x", state=np.zeros((1, 6)))["pixel_values"],
                               rtol=0, atol=0)  # fmt: skip
    wrong_shape = torch.zeros(3, 5)
    other = processor(images=views, text="x", state=np.zeros((1, 6)), pixel_buffer=wrong_shape)["pixel_values"]
    assert other.data_ptr() != wrong_shape.data_ptr() and not torch.isnan(other).any()


def test_a_pixel_buffer_that_cannot_take_the_pixels_in_place_is_replaced(oft):
    """An earlier `pixel_values` moved to another device (here `meta`, as `.to("cuda")` would) or tracked by autograd
    is not written into: the call allocates fresh pixels instead of failing in the copy."""
    _, _, processor = oft
    processor = copy.deepcopy(processor)
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    processor.image_size = [2 * factor, 3 * factor]  # the batched image path, which fills buffers
    views = random_views(np.random.default_rng(2), 1, size=2 * factor)
    expected = processor(images=views, text="x", state=np.zeros((1, 6)))["pixel_values"]
    for buffer in (torch.empty_like(expected, device="meta"), torch.zeros_like(expected, requires_grad=True)):
        written = processor(images=views, text="x", state=np.zeros((1, 6)), pixel_buffer=buffer)["pixel_values"]
        assert written.device.type == "cpu" and not written.requires_grad
        torch.testing.assert_close(written, expected, rtol=0, atol=0)


def test_a_call_in_flight_keeps_its_pixel_buffer(oft):
    """A buffer is taken out of the pool for the length of a call: a call that starts while another is running
    (another thread, or here one nested inside the model's forward) gets a buffer of its own, so neither call's
    pixels are overwritten by the other's."""
    _, model, processor = oft
    processor = copy.deepcopy(processor)
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    processor.image_size = [2 * factor, 2 * factor]  # the batched image path, which fills buffers
    policy = VLAPolicy(model, processor)
    rng = np.random.default_rng(11)
    first, second = [{"images": {cam: rng.integers(0, 256, (*processor.image_size, 3), dtype=np.uint8)
                                 for cam in ("primary", "wrist")},
                      "instruction": "open the drawer", "state": rng.normal(size=processor.state_dim)}
                     for _ in range(2)]  # fmt: skip

    def expected(obs):
        fresh = processor(images=[[obs["images"]["primary"], obs["images"]["wrist"]]], text=[obs["instruction"]],
                          state=obs["state"][None])  # fmt: skip
        return processor.decode_actions(model.predict_action(**fresh))[0]

    policy.predict(first)  # one buffer in the pool now
    original, nested, calls = model.predict_action, [], []

    def predict_action(**inputs):
        calls.append(1)
        if len(calls) == 1:  # the outer call: another call runs before this one reads its pixels
            nested.append(policy.predict(second))
        return original(**inputs)

    try:
        model.predict_action = predict_action
        outer = policy.predict(first)
    finally:
        del model.predict_action
    np.testing.assert_allclose(outer, expected(first), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nested[0], expected(second), rtol=1e-5, atol=1e-6)
    assert len(policy._pixel_buffers) == 2  # both returned to the pool


def test_replaced_statistics_take_effect_in_normalising_and_decoding(tiny_vlm_dirs):
    from hf_vla.normalization import compute_stats, normalize, unnormalize

    _, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    rng = np.random.default_rng(1)
    views, state = random_views(rng, 1), rng.normal(size=(1, 6))
    chunk = rng.uniform(-1, 1, size=(1, 4, 7)).astype(np.float32)
    before = processor(images=views, text="open the drawer", state=state)["state"].numpy()
    decoded_before = processor.decode_actions(chunk)  # compiles and keeps the first statistics
    new = {"action": compute_stats(rng.normal(5.0, 2.0, size=(64, 7)), "mean_std"),
           "state": compute_stats(rng.normal(-3.0, 0.5, size=(64, 6)), "min_max")}
    processor.set_norm_stats("bridge", new)
    after = processor(images=views, text="open the drawer", state=state)["state"].numpy()
    np.testing.assert_allclose(after, normalize(state, new["state"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(processor.decode_actions(chunk), unnormalize(chunk, new["action"]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(after, before) and not np.allclose(processor.decode_actions(chunk), decoded_before)


def test_stored_statistics_are_checked_plain_copies(tiny_vlm_dirs, tmp_path):
    _, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    rng = np.random.default_rng(3)
    chunk = rng.uniform(-1, 1, size=(1, 4, 7)).astype(np.float32)
    stats = processor.compute_norm_stats("arm", rng.normal(size=(64, 7)), rng.normal(size=(64, 6)))
    decoded = processor.decode_actions(chunk, unnorm_key="arm")
    stats["action"]["mode"][0] = "identity"  # the caller's dict is not the processor's
    stats["action"]["q99"][1] = 50.0
    np.testing.assert_array_equal(processor.decode_actions(chunk, unnorm_key="arm"), decoded)
    processor.set_norm_stats("numpy", {"action": {k: np.asarray(v) for k, v in processor.norm_stats["arm"]["action"]
                                                  .items()}, "num_transitions": np.int64(64)})  # fmt: skip
    processor.save_pretrained(tmp_path)  # numpy values stored as JSON numbers
    reloaded = VLAProcessor.from_pretrained(tmp_path)
    for key in ("arm", "numpy"):
        np.testing.assert_array_equal(reloaded.decode_actions(chunk, unnorm_key=key), decoded)

    good = processor.norm_stats["arm"]["action"]
    for name, low, high, message in (("std", None, None, r"std: negative at dimension\(s\) \[2\]"),
                                     ("min", "min", "max", r"min: above max at dimension\(s\) \[2\]"),
                                     ("q01", "q01", "q99", r"q01: above q99 at dimension\(s\) \[2\]")):  # fmt: skip
        bad = {k: list(v) for k, v in good.items()}
        if low is None:
            bad["std"][2] = -1.0
        else:
            bad[low][2], bad[high][2] = good[high][2] + 1.0, good[low][2]
        with pytest.raises(ValueError, match=r"norm_stats\['bad'\]\['action'\]\." + message):
            processor.set_norm_stats("bad", {"action": bad})


def test_processor_refuses_a_template_without_the_instruction_and_reads_bf16_tensors(tiny_vlm_dirs):
    _, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"])
    with pytest.raises(ValueError, match=r"prompt_template: expected a text containing '\{instruction\}'"):
        VLAProcessor(processor.image_processor, processor.tokenizer, prompt_template="Do the task.")
    rng = np.random.default_rng(4)
    views = random_views(rng, 1)
    state, actions = torch.randn(1, 6), torch.rand(1, 4, 7)
    exact = processor(images=views, text="open", state=state.bfloat16().float(), actions=actions.bfloat16().float())
    low = processor(images=views, text="open", state=state.bfloat16(), actions=actions.bfloat16())
    assert torch.equal(low["state"], exact["state"]) and torch.equal(low["actions"], exact["actions"])

    # the cached prompt follows the tokenizer's pad token (left padding of a batch)
    texts = ["open", "open the drawer slowly please"]
    first = processor(images=random_views(rng, 2), text=texts, state=np.zeros((2, 6)))["input_ids"]
    processor.tokenizer = copy.deepcopy(processor.tokenizer)
    processor.tokenizer.pad_token = "<|vision_end|>"
    again = processor(images=random_views(rng, 2), text=texts, state=np.zeros((2, 6)))["input_ids"]
    pad = processor.tokenizer.pad_token_id
    assert again[0, 0] == pad and first[0, 0] != pad
