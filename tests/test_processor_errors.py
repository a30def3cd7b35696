"""Bad input gets a ValueError naming the field, the expected and the received value."""

import re

import numpy as np
import pytest
from PIL import Image
from conftest import make_oft, random_views

from hf_vla import VLAPolicy


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
