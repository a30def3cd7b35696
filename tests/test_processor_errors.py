"""Bad input gets a ValueError naming the field, the expected and the received value."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import make_oft, random_views

from hf_vla import VLAPolicy, VLAProcessor


@pytest.fixture(scope="module")
def oft(tiny_vlm_dirs):
    return make_oft(tiny_vlm_dirs["qwen2_5_vl"])


def call(processor, **overrides):
    rng = np.random.default_rng(0)
    kwargs = dict(images=random_views(rng, 2), text=["a", "b"], state=np.zeros((2, processor.state_dim)))
    kwargs.update(overrides)
    return processor(**kwargs)


def test_wrong_number_of_camera_views(oft):
    _, processor = oft
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"images\[1\]: expected 2 camera views \['primary', 'wrist'\], got 1"):
        call(processor, images=[random_views(rng, 1)[0], random_views(rng, 1, cameras=1)[0]])
    with pytest.raises(ValueError, match=r"images: expected a list of 2 samples"):
        call(processor, images=random_views(rng, 3))


def test_wrong_image_dtype_and_rank(oft):
    _, processor = oft
    views = random_views(np.random.default_rng(0), 2)
    views[0][1] = views[0][1].astype(np.float32)
    with pytest.raises(ValueError, match=r"images\[0\]\[1\]: expected dtype uint8, got float32"):
        call(processor, images=views)
    views = random_views(np.random.default_rng(0), 2)
    views[1][0] = views[1][0][..., 0]
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: expected shape \[H, W, 3\], got \[48, 48\]"):
        call(processor, images=views)
    views = random_views(np.random.default_rng(0), 2)
    views[1][0] = "not an image"
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: expected a uint8 numpy array .* got str"):
        call(processor, images=views)


def test_wrong_state_and_action_dimensions(oft):
    _, processor = oft
    with pytest.raises(ValueError, match=r"state: expected shape \[2, 6\], got \[2, 5\]"):
        call(processor, state=np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 4, 7\], got \[2, 4, 6\]"):
        call(processor, actions=np.zeros((2, 4, 6)))
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 4, 7\], got \[2, 3, 7\]"):
        call(processor, actions=np.zeros((2, 3, 7)))


def test_nan_in_state(oft):
    _, processor = oft
    state = np.zeros((2, 6))
    state[1, 3] = np.nan
    with pytest.raises(ValueError, match="state: contains NaN or inf"):
        call(processor, state=state)
    with pytest.raises(ValueError, match=r"state: values beyond float32's range \(largest magnitude 1e\+300\)"):
        call(processor, state=np.full((2, 6), 1e300))  # finite as float64, inf once cast


def test_unknown_unnorm_key_lists_known_keys(oft):
    _, processor = oft
    processor.compute_norm_stats("libero", np.ones((4, 7)), np.ones((4, 6)))
    try:
        with pytest.raises(ValueError, match=r"unnorm_key: unknown key 'widowx'; known keys: \['bridge', 'libero'\]"):
            processor.decode_actions(np.zeros((1, 4, 7)), unnorm_key="widowx")
        with pytest.raises(ValueError, match=r"several embodiments are known, name one of \['bridge', 'libero'\]"):
            processor.decode_actions(np.zeros((1, 4, 7)))
        # a mixed batch: one key per sample, each row decoded with its own statistics
        normalized = np.random.default_rng(0).uniform(-1, 1, (3, 4, 7)).astype(np.float32)
        mixed = processor.decode_actions(normalized, unnorm_key=["libero", "bridge", "libero"])
        for row, key in enumerate(["libero", "bridge", "libero"]):
            np.testing.assert_array_equal(mixed[row], processor.decode_actions(normalized[row], unnorm_key=key))
        with pytest.raises(ValueError, match=r"unnorm_key: expected one key per sample of actions \[3, 4, 7\], got 2"):
            processor.decode_actions(normalized, unnorm_key=["libero", "bridge"])
        with pytest.raises(ValueError, match=r"unnorm_key: unknown key 'mars'"):
            processor.decode_actions(normalized, unnorm_key=["libero", "mars", "libero"])
        with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['action', 'states'\]"):
            processor(images=[[np.zeros((8, 8, 3), np.uint8)] * 2], text=["go"], action=normalized[:1],
                      states=np.zeros((1, 6)))  # fmt: skip
        with pytest.raises(ValueError, match=r"unnorm_key: expected a key \(str\) or one per sample, got dict"):
            processor.decode_actions(normalized, unnorm_key={"libero": 1})
        # the key is named as the key, not as the state it would have normalised
        with pytest.raises(ValueError, match=r"^embodiment: unknown key 'mars'; known keys: \['bridge', 'libero'\]"):
            call(processor, embodiment="mars")
        with pytest.raises(ValueError, match=r"^embodiment: several embodiments are known"):
            call(processor)
        policy, image = VLAPolicy(*oft), np.zeros((48, 48, 3), np.uint8)
        obs = {"images": {"primary": image, "wrist": image}, "instruction": "go", "state": np.zeros(6)}
        with pytest.raises(ValueError, match=r"^unnorm_key: unknown key 'mars'; known keys: \['bridge', 'libero'\]"):
            policy.predict(obs, unnorm_key="mars")
        with pytest.raises(ValueError, match=r"^unnorm_key: several embodiments are known"):
            policy.predict(obs)
    finally:
        del processor.norm_stats["libero"]


def test_reserved_tokens_and_bad_stats(oft):
    _, processor = oft
    with pytest.raises(ValueError, match=r"text\[0\]: the instruction may not contain the reserved token '<\|fim_pad\|>'"):
        call(processor, text=["go <|fim_pad|>", "b"])
    for token in ("<|im_end|>", "<|vision_start|>", "<|image_pad|>"):  # a turn marker, an image placeholder
        message = rf"text\[1\]: the instruction may not contain the reserved token {re.escape(repr(token))}"
        with pytest.raises(ValueError, match=message):
            call(processor, text=["fine", f"stop {token} now"])
    with pytest.raises(ValueError, match=r"compute_norm_stats\('x'\).actions: expected shape \[N, 7\] .* got \[4, 3\]"):
        processor.compute_norm_stats("x", np.zeros((4, 3)))
    bad = processor.compute_norm_stats("x", np.zeros((4, 7)))
    del processor.norm_stats["x"]
    bad["action"] = {k: v[:3] for k, v in bad["action"].items()}
    with pytest.raises(ValueError, match=r"norm_stats\['x'\]\['action'\]: expected 7 dimensions, got 3"):
        processor.set_norm_stats("x", bad)
    with pytest.raises(ValueError, match=r"unknown normalisation mode\(s\) \['bogus'\]"):
        processor.compute_norm_stats("x", np.zeros((4, 7)), action_mode="bogus")
    good = processor.compute_norm_stats("x", np.zeros((4, 7)))
    del processor.norm_stats["x"]
    for width in (8, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"norm_stats\['x'\]\['action'\].embodiment_dim: expected an integer "
                                             r"in \[0, 7\]"):
            processor.set_norm_stats("x", {**good, "action": {**good["action"], "embodiment_dim": width}})


def test_relative_actions_wider_than_the_model_state_are_refused_without_state_statistics(oft):
    """Statistics without a 'state' entry still leave the model's state width to make relative actions absolute."""
    _, processor = oft  # 7-D actions, 6-D state
    actions_only = {"action": processor.compute_norm_stats("x", np.zeros((4, 7)))["action"]}
    del processor.norm_stats["x"]
    with pytest.raises(ValueError, match=r"norm_stats\['x'\]\['action_mode'\]: 'rel' needs state values for "
                                         r"action dimensions 0\.\.6, but the embodiment's state has 6"):
        processor.set_norm_stats("x", {**actions_only, "action_mode": "rel"})
    processor.set_norm_stats("x", {**actions_only, "action_mode": ["rel"] * 6 + ["abs"]})  # the gripper absolute
    assert processor.embodiment_action_mode("x") == ["rel"] * 6 + ["abs"]
    del processor.norm_stats["x"]


def test_an_action_mode_given_as_normalisation_mode_is_named_and_explained(oft, tmp_path):
    """`action_mode` of compute_norm_stats / compute_stats is the normalisation mode, `action_mode` of load_lerobot
    how actions relate to the state: "rel" passed to the former names the argument and points to the latter."""
    from hf_vla.data import load_lerobot, write_lerobot_dataset
    from hf_vla.data.lerobot_writer import synthetic_episodes

    _, processor = oft
    hint = r"\['rel'\] are action modes, how actions relate to the state: load the data with load_lerobot"
    with pytest.raises(ValueError, match=r"compute_norm_stats\('x'\).action_mode: unknown normalisation mode\(s\) "
                                         r"\['rel'\]; expected one of \['q99', .*\] \(" + hint):
        processor.compute_norm_stats("x", np.zeros((4, 7)), np.zeros((4, 6)), action_mode="rel")
    with pytest.raises(ValueError, match=r"compute_norm_stats\('x'\).state_mode: unknown normalisation mode"):
        processor.compute_norm_stats("x", np.zeros((4, 7)), np.zeros((4, 6)), state_mode="abs")
    assert "x" not in processor.norm_stats
    root = write_lerobot_dataset(tmp_path / "data", synthetic_episodes(1, 4, size=8, cameras=("front",)), fps=10,
                                 video=False)
    with pytest.raises(ValueError, match=r"compute_stats.action_mode: unknown normalisation mode\(s\) \['rel'\]"):
        load_lerobot(root).compute_stats(action_mode=["rel"] * 3 + ["q99"])


def test_model_rejects_wrong_query_count_and_action_shape(oft):
    model, processor = oft
    inputs = call(processor)
    inputs["input_ids"][0, inputs["input_ids"][0] == model.config.action_token_id] = 0
    with pytest.raises(ValueError, match=r"input_ids: expected 4 action-query tokens .* found \[0, 4\]"):
        model.predict_action(**inputs)
    inputs = call(processor)
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 4, 7\] \(one chunk per prompt\), got \[2, 4, 3\]"):
        model(**inputs, actions=inputs["state"].new_zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 4, 7\] \(one chunk per prompt\), got \[1, 4, 7\]"):
        model(**inputs, actions=inputs["state"].new_zeros(1, 4, 7))  # torch would broadcast it into the loss


@pytest.mark.parametrize("variant", ["oft", "gr00t", "bins"])
def test_models_refuse_image_tokens_without_pixels(variant, oft, tmp_path):
    """Without pixel_values the backbone embeds the image placeholders as text: a blind prediction, not an error."""
    from hf_vla.testing import build_tiny_vla

    model, processor = oft if variant == "oft" else build_tiny_vla(variant, tmp_path)
    inputs = call(processor, actions=np.zeros((2, 4, 7)))
    count = int((inputs["input_ids"] == model.config.vlm_config.image_token_id).sum())
    blind = {k: v for k, v in inputs.items() if k != "pixel_values"}
    for run in (lambda: model.predict_action(**blind), lambda: model(**blind)):
        with pytest.raises(ValueError, match=rf"^pixel_values: missing, but input_ids hold {count} image tokens"):
            run()
    with pytest.raises(ValueError, match=r"^image_grid_thw: missing; Qwen-VL reads each image's"):
        model.predict_action(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    own = r" and \['state', 'noise', 'num_steps'\]" if variant == "gr00t" else ""  # a flow model's own arguments
    message = r"predict_action: unexpected argument\(s\) \['num_step'\]; expected the processor's outputs \[.*\]"
    with pytest.raises(TypeError, match=message + own + "$"):
        model.predict_action(**inputs, num_step=1)  # read as nothing, it would run the default step count


def test_policy_observation_errors(oft):
    model, processor = oft
    policy = VLAPolicy(model, processor)
    image = np.zeros((48, 48, 3), np.uint8)
    with pytest.raises(ValueError, match=r"images: expected cameras \['primary', 'wrist'\], missing \['wrist'\], unknown \['top'\]"):
        policy.predict({"images": {"primary": image, "top": image}, "instruction": "go", "state": np.zeros(6)})
    batch = np.zeros((2, 48, 48, 3), np.uint8)
    with pytest.raises(ValueError, match=r"instruction: expected a string or 2 string\(s\), got \['go'\]"):
        policy.predict({"images": {"primary": batch, "wrist": batch}, "instruction": ["go"], "state": np.zeros((2, 6))})
    # one string is every sample's instruction, as the server takes it
    broadcast = policy.predict({"images": {"primary": batch, "wrist": batch}, "instruction": "go",
                                "state": np.zeros((2, 6))})  # fmt: skip
    np.testing.assert_array_equal(broadcast, policy.predict({"images": {"primary": batch, "wrist": batch},
                                                             "instruction": ["go", "go"], "state": np.zeros((2, 6))}))
    with pytest.raises(ValueError, match=r"^state: missing; this model takes a state of 6 values"):
        policy.predict({"images": {"primary": image, "wrist": image}, "instruction": "go"})
    with pytest.raises(ValueError, match=r"images\['wrist'\]: expected dtype uint8, got float32"):
        policy.predict({"images": {"primary": image, "wrist": image.astype(np.float32)}, "instruction": "go"})
    with pytest.raises(ValueError, match=r"images\['wrist'\]: expected an RGB image, got PIL mode 'RGBA'"):
        policy.predict({"images": {"primary": image, "wrist": Image.new("RGBA", (48, 48))}, "instruction": "go"})
    # an RGB PIL image is one unbatched view, as the processor takes it
    pil = policy.predict({"images": {"primary": image, "wrist": Image.fromarray(image + 7)}, "instruction": "go",
                          "state": np.zeros(6)})  # fmt: skip
    np.testing.assert_array_equal(pil, policy.predict({"images": {"primary": image, "wrist": image + 7},
                                                       "instruction": "go", "state": np.zeros(6)}))
    with pytest.raises(ValueError, match=r"images\['wrist'\]: expected \[B, H, W, 3\] or \[H, W, 3\], got \[48, 48\]"):
        policy.predict({"images": {"primary": image, "wrist": image[..., 0]}, "instruction": "go"})


def test_processor_settings_and_statistics_keys(oft):
    _, processor = oft
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    for names, message in (("primary", r"expected a list of camera names, got 'primary'"),
                           (["primary", ""], r"expected a list of camera names"),
                           (["front", "front"], r"expected distinct names, got \['front', 'front'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^camera_names: {message}"):
            type(processor)(image_processor, tokenizer, camera_names=names)
    stats = processor.norm_stats["bridge"]
    for key in (5, None, ("a",), ""):  # JSON keys: an int would break save_pretrained and come back as a string
        with pytest.raises(ValueError, match=rf"^norm_stats: expected a non-empty string key, got {re.escape(repr(key))}"):
            processor.set_norm_stats(key, stats)
        with pytest.raises(ValueError, match=r"^norm_stats: expected a non-empty string key"):
            processor.compute_norm_stats(key, np.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"^norm_stats\['k'\]: expected a dict of 'action' .* got NoneType"):
        processor.set_norm_stats("k", None)
    huge = {**stats, "action": {**stats["action"], "q99": [1e39] * 7}}
    with pytest.raises(ValueError, match=r"norm_stats\['k'\]\['action'\].q99: values beyond float32's range"):
        processor.set_norm_stats("k", huge)
    flags = {**stats, "action": {**stats["action"], "max": [True] * 7}}
    with pytest.raises(ValueError, match=r"norm_stats\['k'\]\['action'\].max: expected numbers, got booleans"):
        processor.set_norm_stats("k", flags)
    nan = np.zeros((4, 7))
    nan[2, 1] = np.nan
    for actions, message in ((nan, "contains NaN or inf"),
                             (np.zeros((0, 7)), r"expected shape .* with N ≥ 1, got \[0, 7\]"),
                             ([[0.0] * 7, [0.0] * 6], "expected a numeric array")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^compute_norm_stats\('k'\).actions: {message}"):
            processor.compute_norm_stats("k", actions)
    assert "k" not in processor.norm_stats


def test_empty_images_booleans_and_mask_values(oft):
    model, processor = oft
    views = random_views(np.random.default_rng(0), 2)
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((48, 0, 3), np.uint8)):
        views[1][0] = empty
        with pytest.raises(ValueError, match=r"^images\[1\]\[0\]: expected an image of at least 1 × 1 pixels, got"):
            call(processor, images=views)
    with pytest.raises(ValueError, match=r"^state: expected a numeric array, got dtype bool"):
        call(processor, state=np.ones((2, 6), bool))
    with pytest.raises(ValueError, match=r"^actions: expected a numeric array, got dtype bool"):
        call(processor, actions=np.ones((2, 4, 7), bool))
    actions = np.zeros((2, 4, 7))
    assert call(processor, actions=actions, action_mask=np.ones((2, 4), bool))["action_mask"].dtype == torch.float32
    for mask in (np.full((2, 4), -1.0), np.full((2, 4, 7), 0.5)):  # a negative loss, or a silent loss weight
        with pytest.raises(ValueError, match=r"^action_mask: expected booleans or 0 / 1, got values"):
            call(processor, actions=actions, action_mask=mask)
    # the model checks what reaches it without the processor
    batch = call(processor, actions=actions)
    for mask, message in ((torch.full((2, 4), -1.0), r"expected booleans or 0 / 1, got values \[-1.0\]"),
                          (torch.ones(2, 3), r"expected shape \[2, 4\] or \[2, 4, 7\], got \[2, 3\]"),
                          (np.ones((2, 4)), r"expected a torch.Tensor \(the processor's output\), got ndarray")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^action_mask: {message}"):
            model(**batch, action_mask=mask)
    with pytest.raises(ValueError, match=r"^actions: expected a torch.Tensor \(the processor's output\), got ndarray"):
        model(**{**batch, "actions": actions})


def test_policy_refuses_unknown_keys_and_mismatched_processor(oft, tiny_vlm_dirs):
    model, processor = oft
    policy, image = VLAPolicy(model, processor), np.zeros((48, 48, 3), np.uint8)
    obs = {"images": {"primary": image, "wrist": image}, "instruction": "go", "state": np.zeros(6)}
    with pytest.raises(ValueError, match=r"^observation: unknown key\(s\) \['states'\]; expected \['images', "):
        policy.predict({**obs, "states": np.zeros(6)})
    with pytest.raises(ValueError, match=r"^observation: both 'instruction' and 'prompt' given"):
        policy.predict({**obs, "prompt": "stop"})
    np.testing.assert_array_equal(policy.predict({**obs, "prompt": None}), policy.predict(obs))  # null: not sent
    for state in ([True, 0.5, 0, 0, 0, 0], [[0.0] * 5 + [False]]):  # numpy would read them as 1.0 / 0.0
        with pytest.raises(ValueError, match=r"^state: expected numbers, got booleans among them"):
            policy.predict({**obs, "state": state})
    with pytest.raises(ValueError, match=r"^state: expected numbers, got booleans among them"):
        call(processor, state=[[0.0] * 6, [True] + [0.0] * 5])
    exact = [0.5, -0.25, 1.0, 0.0, 2.0, -1.0]  # bfloat16 holds these exactly: a tensor state is the same state
    np.testing.assert_array_equal(policy.predict({**obs, "state": torch.tensor(exact, dtype=torch.bfloat16)}),
                                  policy.predict({**obs, "state": np.array(exact)}))  # fmt: skip
    processor.compute_norm_stats("other", np.random.default_rng(1).normal(size=(64, 7)) * 50, np.ones((4, 6)))
    try:  # the observation's unnorm_key is used, as the server takes it
        np.testing.assert_array_equal(policy.predict({**obs, "unnorm_key": "other"}),
                                      policy.predict(obs, unnorm_key="other"))  # fmt: skip
        assert not np.allclose(policy.predict(obs, unnorm_key="other"), policy.predict(obs, unnorm_key="bridge"))
        with pytest.raises(ValueError, match=r"^unnorm_key: the observation names 'other', the call 'bridge'"):
            policy.predict({**obs, "unnorm_key": "other"}, unnorm_key="bridge")
        with pytest.raises(ValueError, match=r"^unnorm_key: expected a key \(str\), got list"):
            policy.predict(obs, unnorm_key=["bridge"])
    finally:
        del processor.norm_stats["other"]
    for state, message in (([[0.0] * 6, [0.0] * 5], "expected a numeric array, got ragged nested sequences"),
                           (np.ones(6, bool), "expected a numeric array, got dtype bool"),
                           (np.zeros((1, 1, 6)), r"expected shape \[S\], got \[1, 1, 6\]")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^state: {message}"):
            policy.predict({**obs, "state": state})
    stateless_processor = VLAProcessor.from_vlm(tiny_vlm_dirs["qwen2_5_vl"], model.config, state_dim=0,
                                                camera_names=["primary", "wrist"])  # fmt: skip
    with pytest.raises(ValueError, match=r"^VLAPolicy: the processor does not match the model: state_dim 6 \(model\) "
                                         r"vs 0 \(processor\)"):
        VLAPolicy(model, stateless_processor)


def test_policy_refuses_an_unknown_default_unnorm_key_when_built(oft):
    model, processor = oft
    with pytest.raises(ValueError, match=r"unnorm_key: unknown key 'brigde'; known keys: \['bridge'\]"):
        VLAPolicy(model, processor, unnorm_key="brigde")
    assert VLAPolicy(model, processor, unnorm_key="bridge").unnorm_key == "bridge"


def test_policy_of_a_stateless_model_still_checks_a_given_state(tiny_vlm_dirs):
    stateless = make_oft(tiny_vlm_dirs["qwen2_5_vl"], state_dim=0)
    policy, image = VLAPolicy(*stateless), np.zeros((48, 48, 3), np.uint8)
    obs = {"images": {"primary": image, "wrist": image}, "instruction": "go"}
    np.testing.assert_array_equal(policy.predict({**obs, "state": np.ones(9)}), policy.predict(obs))  # unused
    for state, message in ((np.full(9, np.nan), "contains NaN or inf"), ("garbage", "expected a numeric array")):
        with pytest.raises(ValueError, match=rf"^state: {message}"):
            policy.predict({**obs, "state": state})


def test_decode_actions_and_action_mask_take_tensors_of_any_dtype_and_refuse_non_numbers(oft):
    """decode_actions' state (relative actions) and the processor's action_mask go through the same check as every
    other raw array: a bfloat16 tensor is read exactly (numpy cannot take one directly), booleans and strings are
    refused with the field named."""
    _, processor = oft
    processor.set_norm_stats("rel", {**processor.norm_stats["bridge"], "action_mode": ["rel"] * 6 + ["abs"]})
    try:
        chunk = np.random.default_rng(0).uniform(-1, 1, (1, 4, 7)).astype(np.float32)
        state = np.array([[0.5, -0.25, 1.0, 0.0, 2.0, -1.0]], np.float32)  # exact in bfloat16
        expected = processor.decode_actions(chunk, unnorm_key="rel", state=state)
        for same in (torch.tensor(state, dtype=torch.bfloat16), torch.tensor(state), state.tolist()):
            np.testing.assert_array_equal(processor.decode_actions(chunk, unnorm_key="rel", state=same), expected)
        low = torch.tensor(chunk).bfloat16()
        np.testing.assert_array_equal(processor.decode_actions(low, unnorm_key="rel"),
                                      processor.decode_actions(low.float(), unnorm_key="rel"))
        for bad, message in ((np.ones((1, 6), bool), "expected a numeric array, got dtype bool"),
                             ([[True] + [0.0] * 5], "expected numbers, got booleans among them"),
                             ("abc", "expected a numeric array, got dtype <U3"),
                             ([[0.0] * 6, [0.0]], "expected a numeric array, got ragged nested sequences"),
                             ):  # fmt: skip
            with pytest.raises(ValueError, match=rf"^state: {message}"):
                processor.decode_actions(chunk, unnorm_key="rel", state=bad)
        for bad, message in ((np.ones((1, 4, 7), bool), "expected a numeric array, got dtype bool"),
                             ("abc", "expected a numeric array, got dtype <U3"),
                             (np.float32(0.5), r"expected last dimension 7, got shape \[\]")):  # fmt: skip
            with pytest.raises(ValueError, match=rf"^actions: {message}"):
                processor.decode_actions(bad, unnorm_key="rel")
    finally:
        del processor.norm_stats["rel"]
    actions = np.zeros((2, 4, 7))
    steps = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bfloat16)
    mask = call(processor, actions=actions, action_mask=steps)
    assert mask["action_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match=r"^action_mask: expected a numeric array, got ragged nested sequences"):
        call(processor, actions=actions, action_mask=[[1, 1, 1, 1], [1, 1, 1]])


def test_policy_errors_name_the_observation_fields_as_sent(oft):
    """The policy's errors speak of the observation the client sent (camera names, `instruction` / `prompt`, the
    state's own shape), not of the processor call it becomes (`images[0][1]`, `text[0]`, a batched `[1, S]`)."""
    model, processor = oft
    policy, image = VLAPolicy(model, processor), np.zeros((48, 48, 3), np.uint8)
    obs = {"images": {"primary": image, "wrist": image}, "instruction": "go", "state": np.zeros(6)}
    batch = np.zeros((2, 48, 48, 3), np.uint8)
    batched = {"images": {"primary": batch, "wrist": batch}, "instruction": ["go", "stop"], "state": np.zeros((2, 6))}
    for bad, message in (
        ({"state": np.zeros(5)}, r"state: expected shape \[6\], got \[5\]"),
        ({"instruction": "go <|im_end|>"},
         r"instruction: the instruction may not contain the reserved token '<\|im_end\|>'"),
        ({"instruction": None, "prompt": "go <|image_pad|>"}, r"prompt: the instruction may not contain the reserved"),
        ({"images": {"primary": image, "wrist": image[:0]}}, r"images\['wrist'\]: expected images of at least 1 × 1 "
                                                             r"pixels, got 0 × 48"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{message}"):
            policy.predict({**obs, **bad})
    for bad, message in (
        ({"state": np.zeros((2, 5))}, r"state: expected shape \[2, 6\], got \[2, 5\]"),
        ({"instruction": ["go", "stop <|im_start|>"]},
         r"instruction\[1\]: the instruction may not contain the reserved"),
        ({"instruction": ["go", 3]}, r"instruction\[1\]: expected str, got int"),
        ({"images": {"primary": batch[:0], "wrist": batch[:0]}, "state": np.zeros((0, 6))},
         r"images: expected at least one sample, got 0$"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{message}"):
            policy.predict({**batched, **bad})
    stats = processor.norm_stats["bridge"]
    processor.set_norm_stats("narrow", {**stats, "state": {**stats["state"], "embodiment_dim": 4}})
    try:  # a mixture's narrower embodiment takes its own state or the padded one
        with pytest.raises(ValueError, match=r"^state: expected shape \[4\] \(embodiment 'narrow''s own state\) or "
                                             r"\[6\] \(padded to the model's\), got \[5\]$"):
            policy.predict({**obs, "state": np.zeros(5)}, unnorm_key="narrow")
        assert policy.predict({**obs, "state": np.zeros(4)}, unnorm_key="narrow").shape == (4, 7)
    finally:
        del processor.norm_stats["narrow"]


def test_image_size_and_state_bins_must_be_usable(oft):
    """Settings are checked when the processor is made: a zero side used to fail inside PIL at the first call, a
    fractional one to be cut down, one state bin to write every state as the same number."""
    _, processor = oft
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    for size in ([0, 56], [-5, 56], [56.7, 56], [True, 56], [56], "224", None):
        with pytest.raises(ValueError, match=r"^image_size: expected \[height, width\], two integers ≥ 1, got "
                                             + re.escape(repr(size))):
            VLAProcessor(image_processor, tokenizer, image_size=size)
    assert VLAProcessor(image_processor, tokenizer, image_size=(np.int64(48), 64)).image_size == [48, 64]
    for bins in (0, 1, 2.5, True):
        with pytest.raises(ValueError, match=rf"^state_bins: expected an integer ≥ 2, got {re.escape(repr(bins))}"):
            VLAProcessor(image_processor, tokenizer, state_bins=bins)


def test_normalised_actions_decode_back_for_every_mode_and_embodiment_width(oft):
    """processor(actions=...) then decode_actions gives the raw chunk back in float32 for every normalisation mode:
    within rounding for the affine ones (q99 inside its range, min_max, mean_std), exactly for identity, binary
    and constant dimensions; q99 values beyond the range come back clamped to it. A mixed batch decodes each sample
    with its own statistics, a narrower embodiment at its own width."""
    from hf_vla.normalization import compute_stats

    _, processor = oft
    rng = np.random.default_rng(3)
    modes = ["q99", "min_max", "mean_std", "binary", "identity", "mean_std", "q99"]
    data = rng.normal(size=(512, 7)) * [1, 3, 0.01, 1, 5, 1, 1] + [0, 1, 2, 0, 0, 0, 0]
    data[:, 3] = rng.integers(0, 2, 512)  # a gripper
    data[:, 5], data[:, 6] = 0.1, 7.0  # constant dimensions
    data = data.astype(np.float32)
    wide = {"action": compute_stats(data, modes), "state": processor.norm_stats["bridge"]["state"]}
    narrow = {"action": {**compute_stats(data, modes), "embodiment_dim": 5}, "state": wide["state"]}
    processor.set_norm_stats("wide", wide)
    processor.set_norm_stats("narrow", narrow)
    try:
        chunks = data[:8].reshape(2, 4, 7)
        chunks[0, 0, 0] = wide["action"]["q99"][0] + 5.0  # beyond the q99 range
        keys = ["wide", "narrow"]
        batch = call(processor, actions=chunks, embodiment=keys)
        mixed = processor.decode_actions(batch["actions"], unnorm_key=keys)
        assert mixed.dtype == np.float32 and mixed.shape == (2, 4, 7)
        own = processor.decode_actions(batch["actions"][1], unnorm_key="narrow")
        assert own.shape == (4, 5)
        np.testing.assert_array_equal(own, mixed[1, :, :5])
        expected = chunks.copy()
        expected[0, 0, 0] = wide["action"]["q99"][0]  # clamped
        np.testing.assert_allclose(mixed[..., :3], expected[..., :3], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mixed[..., 3:], expected[..., 3:])
        assert batch["actions"][0, 0, 0] == 1.0 and set(batch["actions"][..., 3].unique().tolist()) <= {0.0, 1.0}
    finally:
        del processor.norm_stats["wide"], processor.norm_stats["narrow"]
