"""Weighted cross-embodiment mixtures (sampling, alignment, YAML, statistics) and LLaVA-style VLM chat data."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from hf_vla import VLAProcessor
from hf_vla.data import MixtureEntry, VLAMixture, VLMChatCollator, load_lerobot, load_mixture, load_vlm_chat
from hf_vla.data.lerobot_writer import synthetic_episodes, write_lerobot_dataset
from hf_vla.normalization import normalize

HORIZON = 4
FRONT, TOP = "observation.images.front", "observation.images.top"


# ---------------------------------------------------------------- fixtures: tiny LeRobot datasets (image mode)

@pytest.fixture(scope="module")
def robots(tmp_path_factory):
    """Folder with four datasets: arm7 (33 frames, action 7, state 7), arm7b (17, 7, 7), arm4 (13, 4, 3) and
    nostate (9, action 2, no state); returns (folder, {name: episodes})."""
    base = tmp_path_factory.mktemp("robots")
    episodes = {
        "arm7": synthetic_episodes(3, 10, size=8, state_dim=7, action_dim=7, cameras=("front",), seed=0),
        "arm7b": synthetic_episodes(2, 8, size=8, state_dim=7, action_dim=7, cameras=("front",), seed=2),
        "arm4": synthetic_episodes(2, 6, size=8, state_dim=3, action_dim=4, cameras=("top",), seed=1),
        "nostate": synthetic_episodes(2, 4, size=8, action_dim=2, cameras=("front",), seed=3),
    }
    for episode in episodes["nostate"]:
        del episode["frames"]["observation.state"]
    for name, eps in episodes.items():
        write_lerobot_dataset(base / name, eps, fps=10, video=False)
    return base, episodes


def entry(base, name, weight=1.0, embodiment=None, normalization=None, horizon=HORIZON):
    return MixtureEntry(load_lerobot(base / name, action_horizon=horizon), weight, embodiment or name, normalization)


def all_values(episodes, key):
    return np.concatenate([episode["frames"][key] for episode in episodes])


@pytest.fixture(scope="module")
def mixed(robots):
    """arm7 + arm4 + nostate from a dict spec, every camera renamed to "primary"."""
    base, _ = robots
    return load_mixture({"seed": 3, "datasets": [
        {"path": str(base / "arm7"), "weight": 2.0, "embodiment": "arm7", "cameras": {FRONT: "primary"}},
        {"path": str(base / "arm4"), "weight": 1.0, "embodiment": "arm4", "cameras": {TOP: "primary"}},
        {"path": str(base / "nostate"), "weight": 1.0, "embodiment": "nostate", "cameras": {FRONT: "primary"}},
    ]}, action_horizon=HORIZON)


# ---------------------------------------------------------------- sampling

def draws(mixture, total):
    out = []
    for epoch in range(math.ceil(total / len(mixture))):
        mixture.set_epoch(epoch)
        out += [mixture.draw(i) for i in range(len(mixture))]
    mixture.set_epoch(0)
    return out[:total]


@pytest.mark.parametrize("balance", [False, True])
def test_sampling_frequencies_follow_weights(robots, balance):
    base, _ = robots
    mixture = VLAMixture([entry(base, "arm7", 3.0), entry(base, "arm4", 1.0)], seed=0, balance_by_length=balance)
    expected = np.array([3 * 33, 13]) / (3 * 33 + 13) if balance else np.array([0.75, 0.25])
    np.testing.assert_allclose(mixture.probabilities, expected)
    picks = draws(mixture, 4000)
    frequencies = np.bincount([k for k, _ in picks], minlength=2) / len(picks)
    np.testing.assert_allclose(frequencies, expected, atol=0.03)
    frames = [frame for k, frame in picks if k == 0]
    assert set(frames) == set(range(33))  # uniform frames: every one is reached
    assert max(np.bincount(frames)) / min(np.bincount(frames)) < 2.5


def test_epoch_length(robots):
    base, _ = robots
    assert len(VLAMixture([entry(base, "arm7", 3.0), entry(base, "arm4", 1.0)])) == 52  # max(33/.75, 13/.25)
    assert len(VLAMixture([entry(base, "arm7"), entry(base, "arm4")])) == 66  # max(33/.5, 13/.5)
    assert len(VLAMixture([entry(base, "arm7")])) == 33
    # balanced: p = (3*33, 13) / 112, so max(ceil(33 * 112 / 99), 13 * 112 / 13) = 112
    assert len(VLAMixture([entry(base, "arm7", 3.0), entry(base, "arm4", 1.0)], balance_by_length=True)) == 112


def test_draws_are_deterministic_and_change_with_epoch(robots):
    base, _ = robots
    make = lambda seed: VLAMixture([entry(base, "arm7", 2.0), entry(base, "arm4", 1.0)], seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    first = [a.draw(i) for i in range(len(a))]
    assert first == [b.draw(i) for i in range(len(b))]
    assert first != [make(1).draw(i) for i in range(len(a))]
    a.set_epoch(1)
    second = [a.draw(i) for i in range(len(a))]
    assert second != first and second == [a.draw(i) for i in range(len(a))]
    a.set_epoch(0)
    assert [a.draw(i) for i in range(len(a))] == first
    for i in (0, 7, len(a) - 1):  # the sample is the drawn frame, padded
        k, frame = a.draw(i)
        raw = a.entries[k].dataset[frame]
        sample = a[i]
        assert sample["embodiment"] == ("arm7", "arm4")[k] and sample["frame_index"] == raw["frame_index"]
        np.testing.assert_array_equal(sample["actions"][:, : raw["actions"].shape[1]], raw["actions"])
    with pytest.raises(IndexError):
        a[len(a)]
    # negative indices count from the end, as for a list
    assert a.draw(-1) == first[-1] and a.draw(-len(a)) == first[0]
    with pytest.raises(IndexError):
        a[-len(a) - 1]


def test_padding_and_masks_across_embodiments(mixed):
    assert (mixed.action_dim, mixed.state_dim, mixed.action_dims, mixed.state_dims) == (7, 7, [7, 4, 2], [7, 3, 0])
    seen_dims, seen_episode_end = set(), False
    for i in range(len(mixed)):
        k, frame = mixed.draw(i)
        raw, sample = mixed.entries[k].dataset[frame], mixed[i]
        action_dim, state_dim = mixed.action_dims[k], mixed.state_dims[k]
        assert sample["actions"].shape == (HORIZON, 7) and sample["action_mask"].shape == (HORIZON, 7)
        assert sample["action_mask"].dtype == bool and sample["state_dim_mask"].dtype == bool
        np.testing.assert_array_equal(sample["actions"][:, :action_dim], raw["actions"])
        assert not sample["actions"][:, action_dim:].any()
        expected_mask = raw["action_mask"][:, None] & (np.arange(7) < action_dim)
        np.testing.assert_array_equal(sample["action_mask"], expected_mask)
        np.testing.assert_array_equal(sample["state_dim_mask"], np.arange(7) < state_dim)
        np.testing.assert_array_equal(sample["state"][:state_dim], raw.get("state", np.zeros(0)))
        assert sample["state"].shape == (7,) and not sample["state"][state_dim:].any()
        assert list(sample["images"]) == ["primary"]
        seen_dims.add(action_dim)
        seen_episode_end |= not raw["action_mask"].all()
    assert seen_dims == {7, 4, 2} and seen_episode_end


def test_mixture_errors(robots):
    base, _ = robots
    with pytest.raises(ValueError, match="action horizons"):
        VLAMixture([entry(base, "arm7"), entry(base, "arm4", horizon=2)])
    with pytest.raises(ValueError, match=r"datasets\[1\]\.weight"):
        VLAMixture([entry(base, "arm7"), entry(base, "arm4", weight=0.0)])
    with pytest.raises(ValueError, match=r"datasets\[0\]\.normalization\.action: expected 7"):
        VLAMixture([entry(base, "arm7", normalization={"action": ["q99", "binary"]})])
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        VLAMixture([entry(base, "arm4", normalization={"state": "q98"})])
    clash = VLAMixture([entry(base, "arm7", embodiment="arm"), entry(base, "arm4", embodiment="arm")])
    with pytest.raises(ValueError, match="embodiment 'arm'.*different dimensions"):
        clash.compute_norm_stats()


def noisy_episodes(cameras, seed):
    """Two episodes whose views are random pixels, different in every camera, frame and dataset."""
    rng = np.random.default_rng(seed)
    episodes = synthetic_episodes(2, 5, size=8, state_dim=3, action_dim=3, cameras=cameras, seed=seed)
    for episode in episodes:
        for camera in cameras:
            key = f"observation.images.{camera}"
            episode["frames"][key] = rng.integers(0, 256, episode["frames"][key].shape, dtype=np.uint8)
    return episodes


def test_each_source_camera_is_read_under_the_name_it_is_mapped_to(tmp_path):
    """Sources whose camera features are named differently give their own frames under the model's names, in the
    order their mapping lists them; a camera left out of the mapping is not read."""
    sources = {"arm_a": noisy_episodes(("front", "wrist"), seed=0),
               "arm_b": noisy_episodes(("top", "hand", "side"), seed=1)}  # fmt: skip
    for name, episodes in sources.items():
        write_lerobot_dataset(tmp_path / name, episodes, fps=10, video=False)
    mapping = {"arm_a": {"observation.images.wrist": "wrist", "observation.images.front": "primary"},
               "arm_b": {"observation.images.top": "primary", "observation.images.hand": "wrist"}}  # side: unused
    mixture = load_mixture({"datasets": [{"path": str(tmp_path / name), "cameras": mapping[name]}
                                         for name in sources]}, action_horizon=2)  # fmt: skip
    mixture.check_camera_names(["primary", "wrist"])
    seen = set()
    for i in range(len(mixture)):
        k, _ = mixture.draw(i)
        name, sample = list(sources)[k], mixture[i]
        frames = sources[name][sample["episode_index"]]["frames"]
        assert list(sample["images"]) == list(mapping[name].values())
        for feature, camera in mapping[name].items():  # image mode is lossless: the exact recorded view
            np.testing.assert_array_equal(sample["images"][camera], frames[feature][sample["frame_index"]])
        seen.add(name)
    assert seen == set(sources)


def test_a_source_without_one_of_the_processors_cameras_is_refused_by_name(robots):
    base, _ = robots
    mixture = load_mixture({"datasets": [
        {"path": str(base / "arm7"), "cameras": {FRONT: "primary"}},
        {"path": str(base / "arm4"), "embodiment": "arm4", "weight": 0.01},  # rarely drawn: would fail late
    ]}, action_horizon=HORIZON)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(
            f"datasets[1] ('arm4').cameras: expected views named ['primary'], got ['{TOP}'] (missing ['primary'])")):
        mixture.check_camera_names(["primary"])
    with pytest.raises(ValueError, match=re.escape(
            "datasets[0] ('arm7').cameras: expected views named ['primary', 'wrist'], got ['primary'] "
            "(missing ['wrist'])")):
        mixture.check_camera_names(["primary", "wrist"])
    plain = [{"images": {"primary": np.zeros((8, 8, 3), np.uint8)}, "instruction": "go",
              "actions": np.zeros((HORIZON, 2), np.float32)}]  # a dataset without LeRobot metadata
    listed = VLAMixture([MixtureEntry(plain, 1.0, "plain")])
    listed.check_camera_names(["primary"])
    with pytest.raises(ValueError, match=re.escape("datasets[0] ('plain').cameras: expected views named ['wrist'], "
                                                   "got ['primary'] (missing ['wrist'])")):
        listed.check_camera_names(["wrist"])


# ---------------------------------------------------------------- YAML

def test_load_mixture_yaml(robots):
    base, _ = robots
    (base / "mix.yaml").write_text(
        "seed: 5\n"
        "datasets:\n"
        "  - path: arm7\n"
        "    weight: 3\n"
        "    embodiment: panda\n"
        "    cameras: {observation.images.front: primary}\n"
        "    action_mode: delta\n"
        "    normalization: {action: [q99, q99, q99, q99, q99, q99, binary], state: min_max}\n"
        "  - path: ./arm4\n"
        "    cameras: [observation.images.top]\n"
    )
    mixture = load_mixture(base / "mix.yaml", action_horizon=HORIZON)
    assert mixture.seed == 5 and mixture.embodiments == ["panda", "arm4"]  # default embodiment: the folder name
    np.testing.assert_allclose(mixture.weights, [0.75, 0.25])
    panda, arm4 = (e.dataset for e in mixture.entries)
    assert panda.root == base / "arm7" and panda.action_mode == "delta" and panda.camera_names == ["primary"]
    assert arm4.action_mode == "abs" and arm4.camera_names == [TOP]
    stats = mixture.compute_norm_stats()
    assert stats["panda"]["action"]["mode"] == ["q99"] * 6 + ["binary"]
    assert stats["panda"]["state"]["mode"] == ["min_max"] * 7
    assert stats["arm4"]["action"]["mode"] == ["q99"] * 4 + ["identity"] * 3
    assert stats["arm4"]["state"]["mode"] == ["q99"] * 3 + ["identity"] * 4
    np.testing.assert_allclose(stats["panda"]["action"]["q99"], panda.compute_stats()["action"]["q99"])  # deltas

    (base / "bad.yaml").write_text("datasets:\n  - path: arm7\n  - path: arm4\n    wieght: 2\n")
    with pytest.raises(ValueError, match=r"datasets\[1\]: unknown key\(s\) \['wieght'\]"):
        load_mixture(base / "bad.yaml", action_horizon=HORIZON)
    with pytest.raises(FileNotFoundError, match=r"datasets\[0\].*missing"):
        load_mixture({"datasets": [{"path": str(base / "missing")}]}, action_horizon=HORIZON)

    # explicit nulls take the defaults; wrongly typed settings are refused by name, never coerced
    arm7 = str(base / "arm7")
    nulls = load_mixture({"datasets": [{"path": arm7, "embodiment": None}]}, action_horizon=HORIZON)
    assert nulls.embodiments == ["arm7"]
    bad_settings = [
        ({"balance_by_length": "false"}, r"balance_by_length: expected true or false, got 'false'"),
        ({"seed": 1.7}, r"seed: expected a non-negative integer, got 1.7"),
        ({"weight": "abc"}, r"datasets\[0\]\.weight: expected a positive number, got 'abc'"),
        ({"embodiment": 5}, r"datasets\[0\]\.embodiment: expected a non-empty string, got 5"),
        ({"cameras": 5}, r"datasets\[0\]\.cameras: expected a camera key.*got 5"),
        ({"cameras": {FRONT: None}}, r"datasets\[0\]\.cameras: expected a name \(a non-empty string\) for each "
                                     rf"camera key, got \{{'{FRONT}': None\}}"),  # YAML `{front: }`
        ({"normalization": "min_max"}, r"datasets\[0\]\.normalization: expected a mapping.*got 'min_max'"),
    ]
    for setting, message in bad_settings:
        top = {k: v for k, v in setting.items() if k in ("balance_by_length", "seed")}
        item = {"path": arm7, **{k: v for k, v in setting.items() if k not in top}}
        with pytest.raises(ValueError, match=message):
            load_mixture({"datasets": [item], **top}, action_horizon=HORIZON)


# ---------------------------------------------------------------- statistics

def test_compute_norm_stats_matches_numpy(robots):
    base, episodes = robots
    mixture = VLAMixture([entry(base, "arm7", embodiment="arm7"), entry(base, "arm7b", embodiment="arm7"),
                          entry(base, "arm4"), entry(base, "nostate")])
    stats = mixture.compute_norm_stats()
    assert sorted(stats) == ["arm4", "arm7", "nostate"]

    merged = {key: np.concatenate([all_values(episodes["arm7"], key), all_values(episodes["arm7b"], key)])
              for key in ("action", "observation.state")}
    for feature, values in (("action", merged["action"]), ("state", merged["observation.state"])):
        got = stats["arm7"][feature]
        np.testing.assert_allclose(got["mean"], values.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["std"], values.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["q01"], np.quantile(values, 0.01, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["q99"], np.quantile(values, 0.99, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["min"], values.min(0))
        np.testing.assert_allclose(got["max"], values.max(0))
    assert (stats["arm7"]["num_transitions"], stats["arm7"]["num_trajectories"]) == (50, 5)

    arm4 = stats["arm4"]["action"]
    actions = all_values(episodes["arm4"], "action")
    np.testing.assert_allclose(arm4["q99"][:4], np.quantile(actions, 0.99, axis=0), rtol=1e-5, atol=1e-6)
    assert arm4["mode"][4:] == ["identity"] * 3 and arm4["std"][4:] == [1.0] * 3 and arm4["mean"][4:] == [0.0] * 3
    nostate = stats["nostate"]
    assert nostate["state"]["mode"] == ["identity"] * 7 and nostate["state"]["q99"] == [0.0] * 7
    assert (nostate["num_transitions"], nostate["num_trajectories"]) == (9, 2)

    different_modes = VLAMixture([entry(base, "arm7", embodiment="arm7"),
                                  entry(base, "arm7b", embodiment="arm7", normalization={"action": "min_max"})])
    with pytest.raises(ValueError, match="different normalisation modes"):
        different_modes.compute_norm_stats()
    delta = MixtureEntry(load_lerobot(base / "arm7b", action_horizon=HORIZON, action_mode="delta"), 1.0, "arm7")
    with pytest.raises(ValueError, match=r"embodiment 'arm7'.*different action modes \('abs' vs 'delta'\)"):
        VLAMixture([entry(base, "arm7", embodiment="arm7"), delta]).compute_norm_stats()
    partly = MixtureEntry(load_lerobot(base / "arm7b", action_horizon=HORIZON, action_mode=["delta"] * 6 + ["abs"]),
                          1.0, "arm7")  # fmt: skip
    with pytest.raises(ValueError, match=r"embodiment 'arm7'.*different action modes \('delta' vs 'delta' on "
                                         r"dimensions \[0, 1, 2, 3, 4, 5\]\)"):
        VLAMixture([delta, partly]).compute_norm_stats()


def test_action_modes_of_a_narrower_embodiment_are_padded_absolute(robots, tmp_path, tiny_vlm_dirs):
    base, _ = robots
    small = synthetic_episodes(2, 6, size=8, state_dim=3, action_dim=3, cameras=("front",), seed=4)
    write_lerobot_dataset(tmp_path / "small", small, fps=10, video=False)
    mixture = load_mixture({"datasets": [{"path": str(base / "arm7")},
                                         {"path": str(tmp_path / "small"), "action_mode": ["rel", "rel", "abs"]}]},
                           action_horizon=HORIZON)  # fmt: skip
    stats = mixture.compute_norm_stats()
    assert stats["small"]["action_mode"] == ["rel", "rel"] + ["abs"] * 5 and stats["arm7"]["action_mode"] == "abs"
    uniform = load_mixture({"datasets": [{"path": str(base / "arm7")},
                                         {"path": str(tmp_path / "small"), "action_mode": "rel"}]},
                           action_horizon=HORIZON).compute_norm_stats()  # fmt: skip
    assert uniform["small"]["action_mode"] == ["rel"] * 3 + ["abs"] * 4  # one mode for its own 3 dimensions
    vlm = tiny_vlm_dirs["qwen2_5_vl"]
    processor = VLAProcessor(AutoImageProcessor.from_pretrained(vlm), AutoTokenizer.from_pretrained(vlm),
                             action_dim=7, action_horizon=HORIZON, state_dim=7)  # fmt: skip
    for key, value in stats.items():
        processor.set_norm_stats(key, value)
    processor.set_norm_stats("uniform", uniform["small"])  # what the mixture computes, the processor takes
    with pytest.raises(ValueError, match=r"\['action_mode'\]: expected 'abs' on the padded dimensions 3\.\.6, got "):
        processor.set_norm_stats("bad", {**stats["small"], "action_mode": "rel"})  # no state value to be relative to
    late = ["abs"] * 4 + ["rel"] + ["abs"] * 2  # action dimension 4 against a 3-value state
    with pytest.raises(ValueError, match=r"\['action_mode'\]: 'rel' on dimensions \[4\] needs state values for action "
                                         r"dimensions 0\.\.4, but the embodiment's state has 3"):
        processor.set_norm_stats("bad", {**stats["arm7"], "state": stats["small"]["state"], "action_mode": late})
    processor.set_norm_stats("listed", {**stats["arm7"], "action_mode": ["abs"] * 7})
    assert processor.norm_stats["listed"]["action_mode"] == "abs"  # stored in one form: equal modes compare equal
    sample = mixture.entries[1].dataset[4]
    normalized = processor(images=[[np.zeros((8, 8, 3), np.uint8)]], text=["go"], actions=np.pad(
        sample["actions"], ((0, 0), (0, 4)))[None], embodiment="small")["actions"]  # fmt: skip
    recorded = small[0]["frames"]["action"][4:4 + HORIZON]
    decoded = processor.decode_actions(normalized[0], unnorm_key="small", state=sample["state"])
    np.testing.assert_allclose(decoded[: len(recorded)], recorded, rtol=1e-5, atol=1e-5)


def test_stats_feed_processor_for_a_mixed_batch(mixed, tiny_vlm_dirs):
    vlm_dir = tiny_vlm_dirs["qwen2_5_vl"]
    processor = VLAProcessor(AutoImageProcessor.from_pretrained(vlm_dir), AutoTokenizer.from_pretrained(vlm_dir),
                             image_size=[28, 28], action_dim=mixed.action_dim, action_horizon=HORIZON,
                             state_dim=mixed.state_dim)
    stats = mixed.compute_norm_stats()
    for key, value in stats.items():
        processor.set_norm_stats(key, value)
    picked = {}
    for i in range(len(mixed)):
        k, _ = mixed.draw(i)
        picked.setdefault(k, []).append(i)
    samples = [mixed[i] for k in sorted(picked) for i in picked[k][:2]]
    batch = processor(
        images=[[s["images"]["primary"]] for s in samples], text=[s["instruction"] for s in samples],
        state=np.stack([s["state"] for s in samples]), actions=np.stack([s["actions"] for s in samples]),
        action_mask=np.stack([s["action_mask"] for s in samples]), embodiment=[s["embodiment"] for s in samples],
    )
    assert batch["actions"].shape == (6, HORIZON, 7) and batch["action_mask"].shape == (6, HORIZON, 7)
    for b, sample in enumerate(samples):
        own = stats[sample["embodiment"]]
        np.testing.assert_allclose(batch["actions"][b].numpy(), normalize(sample["actions"], own["action"]), atol=1e-6)
        np.testing.assert_allclose(batch["state"][b].numpy(), normalize(sample["state"], own["state"]), atol=1e-6)
        assert not batch["actions"][b][:, ~sample["action_mask"].any(0)].any()  # padded dims stay zero
    assert {s["embodiment"] for s in samples} == {"arm7", "arm4", "nostate"}


def test_a_mixture_model_predicts_and_serves_each_embodiment_at_its_own_width(mixed, tiny_vlm_dirs):
    from hf_vla import AutoModelForVLA, VLAPolicy
    from hf_vla.serving.client import PolicyClient, ServerError
    from hf_vla.serving.server import PolicyServer

    vlm_dir = tiny_vlm_dirs["qwen2_5_vl"]
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="oft", action_dim=mixed.action_dim, action_horizon=HORIZON,
                                     state_dim=mixed.state_dim)  # 7 and 7: arm4 (4, 3) and nostate (2, 0) padded
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary"], image_size=[28, 28])
    for key, value in mixed.compute_norm_stats().items():
        processor.set_norm_stats(key, value)
    assert {k: processor.embodiment_dims(k) for k in ("arm7", "arm4", "nostate")} == {
        "arm7": (7, 7), "arm4": (4, 3), "nostate": (2, 0)}
    policy = VLAPolicy(model, processor)
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    obs = {"images": {"primary": image}, "instruction": "stack the cubes"}
    state3 = np.array([0.2, -0.1, 0.3], np.float32)

    own = policy.predict({**obs, "state": state3}, unnorm_key="arm4")
    padded, normalized = policy.predict({**obs, "state": np.r_[state3, np.zeros(4, np.float32)]}, unnorm_key="arm4",
                                        return_normalized=True)  # fmt: skip
    assert own.shape == (HORIZON, 4)  # arm4's own action dimensions, not the mixture's 7
    np.testing.assert_array_equal(own, padded)  # its own state is zero-padded, as the mixture trained it
    np.testing.assert_allclose(own, processor.decode_actions(normalized, "arm4"), atol=1e-6)
    assert policy.predict({**obs, "state": np.zeros(7)}, unnorm_key="arm7").shape == (HORIZON, 7)
    nostate = policy.predict(obs, unnorm_key="nostate")  # no state: zeros, as in training
    np.testing.assert_array_equal(nostate, policy.predict({**obs, "state": np.zeros(7)}, unnorm_key="nostate"))
    assert nostate.shape == (HORIZON, 2)
    with pytest.raises(ValueError, match=r"state: expected shape \[3\] \(embodiment 'arm4'.s own state\) or "
                                         r"\[7\] \(padded to the model's\), got \[5\]"):  # as sent: unbatched
        policy.predict({**obs, "state": np.zeros(5)}, unnorm_key="arm4")
    with pytest.raises(ValueError, match=r"state: missing; this model takes a state of 3 values"):
        policy.predict(obs, unnorm_key="arm4")

    with PolicyServer(policy, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        assert client.metadata["embodiment_dims"]["arm4"] == {"action_dim": 4, "state_dim": 3}
        reply = client.infer({**obs, "state": state3, "unnorm_key": "arm4"})["actions"]
        np.testing.assert_allclose(reply, own, atol=1e-5)
        np.testing.assert_allclose(client.infer({**obs, "unnorm_key": "nostate"})["actions"], nostate, atol=1e-5)
        with pytest.raises(ServerError, match=r"state: expected 3 \(embodiment 'arm4'.s own\) or 7 values per "
                                              r"sample, got 5"):
            client.infer({**obs, "state": np.zeros(5, np.float32), "unnorm_key": "arm4"})
        with pytest.raises(ServerError, match=r"state: missing; this model takes a state of 3 values"):
            client.infer({**obs, "unnorm_key": "arm4"})
        client.configure(gripper_dims=[6])  # valid for the model's 7 dimensions, not for arm4's 4
        with pytest.raises(ServerError, match=r"gripper_dims: indices \[6\] out of range for action_dim 4 "
                                              r"\(embodiment 'arm4'.s own width\)"):
            client.infer({**obs, "state": state3, "unnorm_key": "arm4"})
        assert client.infer({**obs, "state": np.zeros(7), "unnorm_key": "arm7"})["actions"].shape == (HORIZON, 7)


# ---------------------------------------------------------------- VLM chat data

CHAT = [
    {"id": "one", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A red block."},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "Next to the bowl."}]},
    {"images": ["red.png", "gray.png"], "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "Compare <image> with <image> please"}, {"from": "gpt", "value": "Same size."}]},
    {"image": "wide.png", "conversations": [
        {"from": "human", "value": "Describe the scene."}, {"from": "gpt", "value": "An open drawer."}]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "red.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "gray.png")  # mode L
    Image.fromarray(rng.integers(0, 256, (24, 64, 3), dtype=np.uint8)).save(root / "wide.png")
    (root / "chat.json").write_text(json.dumps(CHAT))
    (root / "lines").mkdir()
    rows = [{"images": ["wide.png"], "conversations": [{"role": "user", "content": "<image>Hi"},
                                                       {"role": "assistant", "content": "Hello."}]},
            {"image": "missing.png", "conversations": CHAT[0]["conversations"]}]
    (root / "lines" / "chat.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


def test_load_json_and_jsonl(chat_dir):
    data = load_vlm_chat(chat_dir / "chat.json")
    assert len(data) == 4
    first = data[0]
    assert [image.shape for image in first["images"]] == [(30, 40, 3)] and first["images"][0].dtype == np.uint8
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    assert first["messages"][0]["content"] == "<image>\nWhat is on the table?"
    second = data[1]
    assert [image.shape for image in second["images"]] == [(30, 40, 3), (20, 20, 3)]  # gray → RGB
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant"]
    assert data[2]["messages"][0]["content"] == "<image>\nDescribe the scene."  # LLaVA convention
    assert data[3]["images"] == []

    files = [chat_dir / "chat.json", chat_dir / "lines" / "chat.jsonl"]
    # a missing image is found when the files are read, not hours into training
    with pytest.raises(FileNotFoundError, match=r"^1 image file\(s\) not found: \S*missing\.png \(\S*chat\.jsonl "
                                                r"item 1\) \(image paths are relative to \S*chat"):
        load_vlm_chat(files, image_root=chat_dir)
    with pytest.raises(FileNotFoundError, match=r"^2 image file\(s\) not found: \S*lines/wide\.png .*relative to the "
                                                r"folder of each data file"):
        load_vlm_chat(chat_dir / "lines" / "chat.jsonl")  # without image_root: relative to lines/
    both = load_vlm_chat(files, image_root=chat_dir, check_images=False)
    assert len(both) == 6 and both[4]["images"][0].shape == (24, 64, 3)
    assert both[4]["messages"] == [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(FileNotFoundError, match=r"missing\.png.*dataset index 5.*chat\.jsonl item 1"):
        both[5]


def test_chat_format_errors(tmp_path):
    def load(item):
        (tmp_path / "bad.json").write_text(json.dumps([CHAT[3], item]))
        return load_vlm_chat(tmp_path / "bad.json")

    turns = CHAT[0]["conversations"]
    with pytest.raises(ValueError, match=r"item 1: 1 <image> placeholder\(s\) for 2 image\(s\)"):
        load({"images": ["a.png", "b.png"], "conversations": turns})
    with pytest.raises(ValueError, match=r"item 1 conversations\[0\]: unknown role 'robot'"):
        load({"conversations": [{"from": "robot", "value": "x"}]})
    with pytest.raises(ValueError, match="no assistant"):
        load({"conversations": turns[:1]})
    with pytest.raises(ValueError, match=r"item 1: opens with an assistant \('gpt'\) turn that no prompt precedes"):
        load({"conversations": turns[1:]})


def test_image_keys_left_null_or_empty_by_a_uniform_export_do_not_hide_the_other_key(chat_dir, tmp_path):
    # exports with one schema for every row (pandas, datasets.to_json) write the unused key as null or []
    turns = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A block."}]
    items = [{"image": None, "images": ["red.png", "wide.png"], "conversations": turns},
             {"image": "red.png", "images": [], "conversations": turns},
             {"image": None, "images": None, "conversations": turns}]  # fmt: skip
    (tmp_path / "uniform.json").write_text(json.dumps(items))
    data = load_vlm_chat(tmp_path / "uniform.json", image_root=chat_dir)
    assert [[image.shape for image in data[i]["images"]] for i in range(3)] == [
        [(30, 40, 3), (24, 64, 3)], [(30, 40, 3)], []]
    assert data[0]["messages"][0]["content"] == "<image>\n<image>\nWhat is this?"
    (tmp_path / "both.json").write_text(json.dumps([{"image": "red.png", "images": ["wide.png"],
                                                     "conversations": turns}]))  # fmt: skip
    with pytest.raises(ValueError, match=r"item 0: both 'image' and 'images' hold images"):
        load_vlm_chat(tmp_path / "both.json")


def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    from transformers.image_utils import load_image

    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate the stored pixels by 90° clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    turns = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A block."}]
    (tmp_path / "chat.json").write_text(json.dumps([{"image": "turned.png", "conversations": turns}]))
    (image,) = load_vlm_chat(tmp_path / "chat.json")[0]["images"]
    np.testing.assert_array_equal(image, np.rot90(pixels, k=-1))
    np.testing.assert_array_equal(image, np.asarray(load_image(str(tmp_path / "turned.png"))))


def test_trl_messages_with_content_parts_read_as_the_llava_form(chat_dir, tmp_path):
    """TRL's conversational format: `messages` of {role, content} whose content is a list of text / image parts."""
    trl = [{"images": ["red.png", "gray.png"], "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                             {"type": "text", "text": " with "}, {"type": "image"},
                                             {"type": "text", "text": " please"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Same size."}]}]},
           {"image": None, "images": ["wide.png"], "conversations": None, "messages": [
                {"from": None, "role": "user", "value": None, "content": "Describe the scene."},
                {"role": "assistant", "content": "An open drawer."}]}]  # fmt: skip
    (tmp_path / "trl.json").write_text(json.dumps(trl))
    data, llava = load_vlm_chat(tmp_path / "trl.json", image_root=chat_dir), load_vlm_chat(chat_dir / "chat.json")
    for trl_index, llava_index in ((0, 1), (1, 2)):
        assert data[trl_index]["messages"] == llava[llava_index]["messages"]
        for ours, theirs in zip(data[trl_index]["images"], llava[llava_index]["images"], strict=True):
            np.testing.assert_array_equal(ours, theirs)

    def load(item):
        (tmp_path / "bad.json").write_text(json.dumps([item]))
        return load_vlm_chat(tmp_path / "bad.json")

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match=r"item 0: both 'conversations' and 'messages'"):
        load({"messages": turns, "conversations": turns})
    with pytest.raises(ValueError, match=r"item 0 messages\[1\].content\[0\]: expected \{'type': 'text', 'text': str\} "
                                         r"or \{'type': 'image'\}, got \{'type': 'video'\}"):
        load({"messages": [turns[0], {"role": "assistant", "content": [{"type": "video"}]}]})
    with pytest.raises(ValueError, match=r"item 0 messages\[0\]: expected a string 'value' / 'content' or a list"):
        load({"messages": [{"role": "user", "content": 3}, turns[1]]})


def chat_processor(vlm_dir, image_size=(56, 56)):
    return VLAProcessor(AutoImageProcessor.from_pretrained(vlm_dir), AutoTokenizer.from_pretrained(vlm_dir),
                        image_size=list(image_size))


def labelled_runs(labels):
    """Contiguous runs of labelled positions, as token id lists."""
    runs, current = [], []
    for token in labels.tolist() + [-100]:
        if token == -100:
            runs, current = (runs + [current] if current else runs), []
        else:
            current.append(token)
    return runs


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_encode_chat_labels_only_assistant_replies(chat_dir, tiny_vlm_dirs, family):
    processor = chat_processor(tiny_vlm_dirs[family])
    tokenizer = processor.tokenizer
    data = load_vlm_chat(chat_dir / "chat.json")
    samples = [data[i] for i in range(len(data))]
    batch = VLMChatCollator(processor)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels"}

    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    grid_tokens = (batch["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert batch["image_grid_thw"].shape[0] == 4 and batch["pixel_values"].shape[0] == sum(
        batch["image_grid_thw"].prod(-1).tolist())
    per_sample = [grid_tokens[0], grid_tokens[1] + grid_tokens[2], grid_tokens[3], 0]
    assert (batch["input_ids"] == image_id).sum(-1).tolist() == per_sample
    assert batch["mm_token_type_ids"].sum(-1).tolist() == per_sample

    for b, sample in enumerate(samples):
        mask = batch["attention_mask"][b]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        labels = batch["labels"][b]
        assert (labels[length:] == -100).all() and (labels[batch["input_ids"][b] == image_id] == -100).all()
        replies = [m["content"] + "<|im_end|>" for m in sample["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in labelled_runs(labels)] == replies
        unpadded = tokenizer.decode(batch["input_ids"][b][:length])
        assert unpadded.count("<|im_start|>assistant\n") == len(replies)
        for message in sample["messages"]:
            assert message["content"].replace("<image>", "") in unpadded.replace("<|image_pad|>", "").replace(
                "<|vision_start|>", "").replace("<|vision_end|>", "")


def test_encode_chat_truncation(chat_dir, tiny_vlm_dirs):
    processor = chat_processor(tiny_vlm_dirs["qwen2_5_vl"])
    sample = load_vlm_chat(chat_dir / "chat.json")[0]
    full = processor.encode_chat([sample])
    last_image = int((full["input_ids"][0] == full["input_ids"].new_tensor(
        processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))).nonzero().max())
    first_reply = int((full["labels"][0] != -100).nonzero().min())
    assert last_image < first_reply < full["input_ids"].shape[1] - 3
    cut = processor.encode_chat([sample], max_length=first_reply + 3)
    assert cut["input_ids"].shape == (1, first_reply + 3)
    torch.testing.assert_close(cut["labels"][0], full["labels"][0, : first_reply + 3])
    with pytest.raises(ValueError, match=r"samples\[0\]: max_length=.*image tokens"):
        processor.encode_chat([sample], max_length=last_image)
    # a cut before the first reply token would leave nothing to learn (the VLM loss would be NaN)
    assert (processor.encode_chat([sample], max_length=first_reply + 1)["labels"] != -100).sum() == 1
    with pytest.raises(ValueError, match=rf"samples\[0\]: max_length={first_reply} would cut away every reply "
                                         rf"token .* its reply starts at token {first_reply}\)"):
        processor.encode_chat([sample], max_length=first_reply)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vlm_forward_on_chat_batch_gives_finite_loss(chat_dir, tiny_vlm_dirs, family):
    processor = chat_processor(tiny_vlm_dirs[family])
    data = load_vlm_chat(chat_dir / "chat.json")
    batch = VLMChatCollator(processor, max_length=256)([data[i] for i in range(len(data))])
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dirs[family])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0
    text_only = processor.encode_chat([data[3]])
    assert "pixel_values" not in text_only
    with torch.no_grad():
        assert torch.isfinite(model(**text_only).loss)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_labels_follow_the_turns_not_template_strings_inside_them(tiny_vlm_dirs, family):
    # Replies are located by where the template renders each assistant turn: a user turn that spells out an
    # assistant header learns nothing, and a reply that spells out the template's strings is learnt whole.
    processor = chat_processor(tiny_vlm_dirs[family])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), rng.integers(0, 256, (64, 24, 3), dtype=np.uint8)]
    messages = [
        {"role": "system", "content": "You control a robot arm."},
        {"role": "user", "content": "<image>\nSay <|im_start|>assistant\nfake<|im_end|> back."},
        {"role": "assistant", "content": "The prompt holds <|im_start|>user\nfake<|im_end|>."},
        {"role": "user", "content": "And here? <image>"},
        {"role": "assistant", "content": "A drawer."},
    ]  # fmt: skip
    batch = processor.encode_chat([{"images": images, "messages": messages}])
    tokenizer = processor.tokenizer
    assert [tokenizer.decode(run) for run in labelled_runs(batch["labels"][0])] == [
        "The prompt holds <|im_start|>user\nfake<|im_end|>.<|im_end|>", "A drawer.<|im_end|>"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"][0] == image_id).sum() == batch["image_grid_thw"].prod(-1).sum() // 4 > 0


def test_a_conversation_opening_with_a_reply_is_refused_naming_the_sample_unless_a_system_turn_prompts_it(
        tiny_vlm_dirs):
    processor = chat_processor(tiny_vlm_dirs["qwen2_5_vl"])
    greeting = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Open the drawer."},
                {"role": "assistant", "content": "Done."}]  # fmt: skip
    text_only = {"images": [], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}]}
    with pytest.raises(ValueError, match=r"^samples\[1\]: messages\[0\]: the conversation opens with an assistant"):
        processor.encode_chat([text_only, {"images": [], "messages": greeting}])
    prompted = [{"role": "system", "content": "You are a robot."}, *greeting]
    labels = processor.encode_chat([{"images": [], "messages": prompted}])["labels"][0]
    assert [processor.tokenizer.decode(run) for run in labelled_runs(labels)] == ["How can I help?<|im_end|>",
                                                                                 "Done.<|im_end|>"]
