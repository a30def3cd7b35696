"""hf_vla serves a converted StarVLA run the way StarVLA's own deployment stack does.

An independent reference, written from StarVLA's code (branch starVLA_dev; each part names the file it follows):

* un-normalisation of the model's output to robot units: the server-side path of StarVLA's current deployment
  (`deployment/model_server/policy_wrapper.py` → `policy_norm_processor.py` → the training DataConfig's
  `StateActionTransform.unapply` → `Normalizer.inverse` in
  `starVLA/dataloader/gr00t_lerobot/transform/state_action.py`),
  with the per-key modes of the DataConfigs the run's `data_mix` resolves to;
* normalisation of the robot state: StarVLA's dataloader (`LeRobotSingleDataset.__getitem__` / `_pack_sample` in
  `starVLA/dataloader/gr00t_lerobot/datasets.py`) runs the DataConfig's `transform()` on the raw state keys, then
  concatenates them in `state_keys` order; the frameworks (QwenOFT, QwenGR00T, QwenPI, QwenPI_v3) use that state as
  given. The server side does the same through `PolicyNormProcessor` (splitting the combined statistics per key);
* the client-side post-processing StarVLA's simulator clients apply to those actions (LIBERO, SimplerEnv WidowX);
* the wire format: `deployment/model_server/tools/websocket_policy_client.py` (`WebsocketClientPolicy`), openpi-style
  msgpack-numpy, the handshake metadata frame, the request payload of `examples/simBenchmarks/LIBERO/eval_files/`
  (`model2libero_interface.py`, `eval_libero.py`) and the reply / error maps of `tools/websocket_policy_server.py`;
  and the clients of StarVLA's servers before they un-normalised (2025: `batch_images` / `instructions` requests,
  `normalized_actions` replies un-normalised by the client, `examples/LIBERO/model2libero_interface.py`).

It is compared with `convert_starvla` + `VLAProcessor.decode_actions` and with `hf_vla.serving.PolicyServer` over a
real loopback websocket. Tiny OFT model (deterministic), fp32, bounded timeouts.
"""

import json
from contextlib import ExitStack

import msgpack
import numpy as np
import pytest
import torch
import yaml
from websockets.sync.client import connect

from hf_vla import AutoModelForVLA, VLAPolicy, VLAProcessor
from hf_vla.hub.convert_starvla import convert_starvla
from hf_vla.serving import PolicyServer, packb
from hf_vla.testing import build_tiny_vlm

TIMEOUT = 30
H, A = 4, 7  # action horizon, action dim
COT = ("Your task is {instruction}. To identify the key objects for your task. "
       "Locate their bounding boxes in [x1,y1,x2,y2] format.")  # the released LIBERO / OXE CoT_prompt
LANG = "put the bowl on the plate"

# ==================================================================================================== StarVLA reference

# --- DataConfigs: per action key, its normalisation mode; keys without one pass through (StateActionTransform).
XYZRPY = ("x", "y", "z", "roll", "pitch", "yaw")
ACTION_KEYS = (*XYZRPY, "gripper")  # every config below concatenates these seven one-dimensional keys
STARVLA_ACTION_MODES = {
    # examples/simBenchmarks/LIBERO/train_files/data_registry/data_config.py: Libero4in1DataConfig.transform
    "libero_franka": {k: "min_max" for k in XYZRPY},
    # ... Libero4in1Q99DataConfig.transform (gripper not normalised)
    "libero_franka_q99": {k: "q99" for k in XYZRPY},
    # ... OpenPILibero4in1DataConfig.transform (all seven q99)
    "openpi_libero_franka": {k: "q99" for k in ACTION_KEYS},
    # starVLA/dataloader/gr00t_lerobot/data_config.py: OxeBridgeDataConfig / OxeRT1DataConfig.transform
    "oxe_bridge": {**{k: "q99" for k in XYZRPY}, "gripper": "binary"},
    "oxe_rt1": {**{k: "q99" for k in XYZRPY}, "gripper": "binary"},
}
# --- DataConfigs: the STATE keys (one dimension each, in the order the sample and the statistics concatenate them)
#     and each key's mode. A key missing from `normalization_modes`, or a DataConfig whose transform() lists no
#     state transform at all, hands the raw value to the model.
LIBERO_STATE_KEYS = (*XYZRPY, "pad", "gripper")
STARVLA_STATE_KEYS = {
    "libero_franka": LIBERO_STATE_KEYS, "libero_franka_q99": LIBERO_STATE_KEYS,
    "openpi_libero_franka": LIBERO_STATE_KEYS, "oxe_bridge": LIBERO_STATE_KEYS,
    "oxe_rt1": ("x", "y", "z", "rx", "ry", "rz", "rw", "gripper"),
}  # fmt: skip
STARVLA_STATE_MODES = {
    # LIBERO data_registry/data_config.py, Libero4in1DataConfig.transform: StateActionToTensor and
    # StateActionTransform apply to the action keys only, so the state reaches the model raw
    "libero_franka": {},
    # ... Libero4in1Q99DataConfig.transform: q99 for every state key
    "libero_franka_q99": {k: "q99" for k in LIBERO_STATE_KEYS},
    # ... OpenPILibero4in1DataConfig.transform: q99 for every state key, gripper and pad included
    "openpi_libero_franka": {k: "q99" for k in LIBERO_STATE_KEYS},
    # starVLA/dataloader/gr00t_lerobot/data_config.py: OxeBridgeDataConfig / OxeRT1DataConfig.transform:
    # q99 for position, rotation and pad, binary for the gripper
    "oxe_bridge": {k: "binary" if k == "gripper" else "q99" for k in LIBERO_STATE_KEYS},
    "oxe_rt1": {k: "binary" if k == "gripper" else "q99" for k in STARVLA_STATE_KEYS["oxe_rt1"]},
}
# DATASET_NAMED_MIXTURES (starVLA/dataloader/gr00t_lerobot/mixtures.py and the LIBERO data_registry): robot types
STARVLA_MIXTURES = {
    "libero_goal": ["libero_franka"],
    "libero_all_q99": ["libero_franka_q99"],
    "openpi_libero_all": ["openpi_libero_franka"],
    "bridge": ["oxe_bridge"],
    "bridge_rt_1": ["oxe_bridge", "oxe_rt1"],
}


def starvla_inverse(mode, x, stats):
    """transform/state_action.py, Normalizer.inverse (torch float32 there; the same ops in numpy float32 here).
    No clipping; a zero range decodes to the low bound; binary thresholds at 0.5 and returns 0 / 1."""
    s = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    if mode == "q99":
        return (x + 1) / 2 * (s["q99"] - s["q01"]) + s["q01"]
    if mode == "min_max":
        return (x + 1) / 2 * (s["max"] - s["min"]) + s["min"]
    if mode == "mean_std":
        return x * s["std"] + s["mean"]
    if mode == "binary":
        return (x > 0.5).astype(np.float32)
    raise AssertionError(mode)


def starvla_forward(mode, x, stats):
    """transform/state_action.py, Normalizer.forward. A dimension whose range is zero keeps its raw value (q99) or
    becomes 0 (min_max); q99 clamps to [-2.2, 2.2] (the current code; an older version clamped to [-1, 1]); binary
    is x > 0.5 as 0 / 1."""
    s = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    x = np.asarray(x, np.float32)
    if mode == "q99":
        span = s["q99"] - s["q01"]
        scaled = 2 * (x - s["q01"]) / np.where(span != 0, span, 1) - 1
        return np.clip(np.where(span != 0, scaled, x), -2.2, 2.2)
    if mode == "min_max":
        span = s["max"] - s["min"]
        return np.where(span != 0, 2 * (x - s["min"]) / np.where(span != 0, span, 1) - 1, 0.0).astype(np.float32)
    if mode == "binary":
        return (x > 0.5).astype(np.float32)
    raise AssertionError(mode)


def starvla_apply_state(raw, statistics, data_mix, unnorm_key):
    """The DataConfig's state transform on raw states [B, S]: the combined 'state' statistics split per state key in
    `state_keys` order (policy_norm_processor.py, _build_dataset_metadata; one dimension per key here), each key
    normalised with its mode or passed through, then concatenated back (datasets.py, _pack_sample)."""
    robot_type = starvla_resolve_robot_type(data_mix, unnorm_key)
    return starvla_per_key(raw, statistics[unnorm_key]["state"], STARVLA_STATE_KEYS[robot_type],
                           STARVLA_STATE_MODES[robot_type], starvla_forward)  # fmt: skip


def starvla_per_key(x, combined, keys, modes, transform):
    """Split the combined [D] statistics and the last axis of `x` evenly per key (the `mask` is skipped), apply
    `transform(mode, part, per_key_stats)` to each key with a mode, pass the others through, concatenate."""
    width = len(combined["q01"]) // len(keys)
    x = np.asarray(x, np.float32)
    parts = []
    for i, key in enumerate(keys):
        cols = slice(i * width, (i + 1) * width)
        per_key = {name: values[cols] for name, values in combined.items() if name != "mask"}
        parts.append(transform(modes[key], x[..., cols], per_key) if key in modes else x[..., cols])
    return np.concatenate(parts, axis=-1)


def starvla_resolve_robot_type(data_mix, unnorm_key):
    """policy_norm_processor.py, _resolve_robot_type: one robot type, or the unnorm_key picks one of several."""
    robot_types = sorted(set(STARVLA_MIXTURES[data_mix]))
    if len(robot_types) == 1:
        return robot_types[0]
    if unnorm_key in robot_types:
        return unnorm_key
    raise ValueError(f"data_mix={data_mix!r} contains multiple robot_types {robot_types}")


def starvla_unapply_actions(normalized, statistics, data_mix, unnorm_key=None):
    """policy_wrapper.py, PolicyServerWrapper.predict_action → policy_norm_processor.py, PolicyNormProcessor:
    pick the statistics (the only key when unnorm_key is None), split the combined [D] arrays per action key
    (_infer_key_dims: D / n_keys each; the `mask` is skipped), un-apply each key's mode, concatenate.
    `normalized`: the framework's `normalized_actions` [B, T, D] → robot units [B, T, D]."""
    if unnorm_key is None:
        if len(statistics) != 1:
            raise ValueError("Multiple unnorm_keys in dataset_statistics.json: pass unnorm_key explicitly")
        unnorm_key = next(iter(statistics))
    modes = STARVLA_ACTION_MODES[starvla_resolve_robot_type(data_mix, unnorm_key)]
    return starvla_per_key(normalized, statistics[unnorm_key]["action"], ACTION_KEYS, modes, starvla_inverse)


def libero_env_gripper(open_gripper):
    """examples/simBenchmarks/LIBERO/eval_files/eval_libero.py, _binarize_gripper_open: 1 - 2 * (g > 0.5)."""
    return 1.0 - 2.0 * (np.asarray(open_gripper, np.float32) > 0.5)


def widowx_env_gripper(open_gripper):
    """examples/SimplerEnv/eval_files/model2simpler_interface.py, ModelClient.step, widowx_bridge: 2 (g > 0.5) - 1."""
    return 2.0 * (np.asarray(open_gripper, np.float32) > 0.5) - 1.0


# --- msgpack-numpy as StarVLA's deployment/model_server/tools/msgpack_numpy.py packs it (openpi-client's format,
#     starvla.md §7): arrays / numpy scalars become maps with bin marker keys and a str dtype.
def _starvla_pack_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise ValueError(f"unsupported dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _starvla_object_hook(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def starvla_pack(obj) -> bytes:
    return msgpack.Packer(default=_starvla_pack_default).pack(obj)


def starvla_unpackb(data: bytes):
    return msgpack.unpackb(data, object_hook=_starvla_object_hook)


class StarVLAClient:
    """tools/websocket_policy_client.py, WebsocketClientPolicy: connect without compression or size limit, read the
    metadata frame, then one packed frame per request; a text frame is the server's traceback (RuntimeError).
    (StarVLA waits forever; `timeout` bounds this test.)"""

    def __init__(self, port, timeout=TIMEOUT):
        self.timeout = timeout
        self._exit = ExitStack()  # websockets >= 17.1 wants a context manager; StarVLA calls connect() bare
        self._ws = self._exit.enter_context(connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                                                    open_timeout=timeout, ping_interval=None, ping_timeout=60))
        self.metadata = starvla_unpackb(self._ws.recv(timeout=timeout))

    def send_frame(self, frame):
        self._ws.send(frame)
        response = self._ws.recv(timeout=self.timeout)
        if isinstance(response, str):
            raise RuntimeError(f"Error in inference server:\n{response}")
        return starvla_unpackb(response)

    def predict_action(self, query_info):
        return self.send_frame(starvla_pack(query_info))

    def close(self):
        self._exit.close()


def libero_query(example, unnorm_key=None):
    """examples/simBenchmarks/LIBERO/eval_files/model2libero_interface.py, ModelClient.step: a flat payload."""
    return {"examples": [example], "unnorm_key": unnorm_key, "do_sample": False, "use_ddim": True,
            "num_ddim_steps": 10}  # fmt: skip


def legacy_query(example):
    """StarVLA's clients before its server un-normalised (examples/LIBERO/model2libero_interface.py of 2025,
    M1Inference.step): a flat `batch_images` / `instructions` payload; the reply is read as
    response["data"]["normalized_actions"] [B, chunk, D] and un-normalised by the client."""
    return {"batch_images": [list(example["image"])], "instructions": [example["lang"]], "unnorm_key": None,
            "do_sample": False, "use_ddim": True, "num_ddim_steps": 10}  # fmt: skip


def legacy_client_unnormalize(normalized, action_stats):
    """M1Inference.unnormalize_actions: clip to [-1, 1], the gripper (dimension 6) to 0 / 1 at 0.5, then min / max
    where the statistics' mask is set."""
    mask = np.asarray(action_stats.get("mask", np.ones_like(action_stats["min"], dtype=bool)))
    high, low = np.asarray(action_stats["max"]), np.asarray(action_stats["min"])
    normalized = np.clip(normalized, -1, 1)
    normalized[:, 6] = np.where(normalized[:, 6] < 0.5, 0, 1)
    return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)


def libero_example(seed, size=256):
    """eval_libero.py: both views (uint8 HWC at the render size, rotated 180°), a `vggt_image` copy, the
    instruction, and the state as float32 [1, 8] (eef pos, axis-angle, two gripper joints)."""
    rng = np.random.default_rng(seed)
    primary, wrist = (np.ascontiguousarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)[::-1, ::-1])
                      for _ in range(2))  # fmt: skip
    state = rng.normal(size=(1, 8)).astype(np.float32)
    return {"image": [primary, wrist], "vggt_image": [primary, wrist], "lang": LANG, "state": state}


# ==================================================================================================== StarVLA runs


def feature(lo, hi, q01, q99):
    lo, hi, q01, q99 = (np.asarray(v, np.float64) for v in (lo, hi, q01, q99))
    return {"mean": ((q01 + q99) / 2).tolist(), "std": ((q99 - q01) / 4).tolist(), "max": hi.tolist(),
            "min": lo.tolist(), "q01": q01.tolist(), "q99": q99.tolist()}  # fmt: skip


# LIBERO-like action statistics (xyz / rpy deltas, gripper recorded as -1 / +1), mask False on the gripper: StarVLA
# marks keys whose name contains "gripper" (datasets.py, generate_action_mask_for_used_keys).
LIBERO_ACTION = feature([-0.9375, -0.9375, -0.9375, -0.1875, -0.3675, -0.36, -1.0],
                        [0.9375, 0.9375, 0.9375, 0.1971, 0.3364, 0.375, 1.0],
                        [-0.7455, -0.6616, -0.9375, -0.1071, -0.2068, -0.1843, -1.0],
                        [0.9375, 0.8759, 0.9321, 0.1039, 0.1768, 0.1457, 1.0])  # fmt: skip
BRIDGE_ACTION = feature([-0.40, -0.35, -0.42, -0.39, -0.44, -0.83, 0.0],
                        [0.41, 0.39, 0.36, 0.42, 0.40, 0.88, 1.0],
                        [-0.0289, -0.0417, -0.0260, -0.0808, -0.0929, -0.2071, 0.0],
                        [0.0288, 0.0409, 0.0405, 0.0815, 0.0782, 0.2036, 1.0])  # fmt: skip
MASK = [True] * 6 + [False]
# State statistics (one column per state key). LIBERO: eef position, axis-angle, two finger joints ("pad", "gripper");
# bridge: eef position, rpy, a constant 0 pad, the gripper opening in [0, 1].
LIBERO_STATE = feature([-0.48, -0.35, 0.0, 1.5, -1.2, -0.9, 0.0, -0.042],
                       [0.21, 0.39, 1.35, 3.6, 1.1, 0.8, 0.042, 0.0],
                       [-0.40, -0.30, 0.01, 2.0, -0.9, -0.6, 0.001, -0.040],
                       [0.15, 0.33, 1.25, 3.3, 0.9, 0.6, 0.040, -0.001])  # fmt: skip
BRIDGE_STATE = feature([0.15, -0.2, -0.05, -0.4, -0.5, -3.1, 0.0, 0.0],
                       [0.45, 0.25, 0.3, 0.4, 0.4, 3.1, 0.0, 1.0],
                       [0.2, -0.15, -0.02, -0.3, -0.4, -2.9, 0.0, 0.05],
                       [0.4, 0.2, 0.2, 0.3, 0.3, 2.9, 0.0, 1.0])  # fmt: skip


def starvla_statistics(data_mix, action=None):
    """dataset_statistics.json as StarVLA writes it: {key: {action: 6 stats + mask, state: 6 stats, counts}}."""
    state = LIBERO_STATE if "libero" in data_mix else BRIDGE_STATE
    keys = {"libero_goal": ["franka"], "libero_all_q99": ["franka"], "openpi_libero_all": ["franka"],
            "bridge": ["oxe_bridge"], "bridge_rt_1": ["oxe_bridge", "oxe_rt1"]}[data_mix]  # fmt: skip
    default = LIBERO_ACTION if "libero" in data_mix else BRIDGE_ACTION
    out = {}
    for i, key in enumerate(keys):
        # distinct per key on xyz/rpy; the gripper keeps its recorded range
        stats = {k: [v * (1 + 0.25 * i) for v in vs[:6]] + list(vs[6:]) for k, vs in (action or default).items()}
        out[key] = {"action": {**stats, "mask": list(MASK)}, "state": state, "num_transitions": 1000,
                    "num_trajectories": 10}  # fmt: skip
    return out


def to_starvla_names(state_dict):
    """hf_vla OFT names → StarVLA's (starvla.md §10)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("vlm.lm_head."):
            new = "qwen_vl_interface.model.lm_head." + key[len("vlm.lm_head."):]
        elif key.startswith("vlm.model."):
            new = "qwen_vl_interface.model.model." + key[len("vlm.model."):]
        elif key.startswith("action_head."):
            new = "action_model.model." + key[len("action_head."):]
        else:
            raise AssertionError(key)
        out[new] = tensor.detach().clone()
    return out


@pytest.fixture(scope="module")
def starvla_run(tmp_path_factory):
    """A tiny QwenOFT run's weights under StarVLA's names, on a tiny Qwen2.5-VL whose tokenizer keeps "🔍" whole."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("starvla_deploy")
    vlm = build_tiny_vlm(root / "Qwen2.5-VL-tiny-Instruct", family="qwen2_5_vl", vocab_size=544)
    tokenizer = AutoTokenizer.from_pretrained(vlm)
    tokenizer.add_tokens(["🔍"])
    tokenizer.save_pretrained(vlm)
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm, variant="oft", action_dim=A, action_horizon=H, state_dim=0,
                                     action_token="🔍", prompt_template=COT)  # fmt: skip
    return {"root": root, "vlm": vlm, "weights": to_starvla_names(model.state_dict())}


_converted = {}


def converted(starvla_run, data_mix, action=None, tag="", include_state=False):
    """Writes a StarVLA run directory (config.yaml, dataset_statistics.json, checkpoints/steps_10_pytorch_model.pt)
    for `data_mix` and converts it; returns (out_dir, the statistics written). With `include_state` the run fed the
    state (QwenOFT writes it into the prompt, so the same weights serve)."""
    name = f"{data_mix}{tag}"
    if name not in _converted:
        run = starvla_run["root"] / f"run_{name}"
        (run / "checkpoints").mkdir(parents=True)
        config = {
            "run_id": f"deploy_{name}", "seed": 42, "version_id": "0.21",
            "framework": {"name": "QwenOFT", "qwenvl": {"base_vlm": str(starvla_run["vlm"])},
                          "action_model": {"action_dim": A, "future_action_window_size": H - 1}},
            "datasets": {"vla_data": {"data_mix": data_mix, "CoT_prompt": COT, "obs_image_size": [56, 56],
                                      "include_state": include_state}},
        }  # fmt: skip
        statistics = starvla_statistics(data_mix, action)
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        (run / "dataset_statistics.json").write_text(json.dumps(statistics))
        torch.save(starvla_run["weights"], run / "checkpoints" / "steps_10_pytorch_model.pt")
        out = convert_starvla(run, starvla_run["root"] / f"out_{name}")
        _converted[name] = (out, statistics)
    return _converted[name]


def normalized_outputs(seed, batch=2):
    """What a StarVLA framework's predict_action may return (normalized_actions [B, T, D]): values past ±1 (flow
    and regression heads are not bounded) and gripper values on both sides of 0.5 (never exactly 0.5)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.6, 1.6, size=(batch, H, A)).astype(np.float32)
    x[0, :, -1] = [0.49, 0.51, -0.2, 1.3]
    return x


# ================================================================================================ 1. un-normalisation


@pytest.mark.parametrize("data_mix", ["libero_goal", "bridge", "bridge_rt_1"])
def test_decode_actions_matches_starvla_server_side_unnormalisation(starvla_run, data_mix):
    out, statistics = converted(starvla_run, data_mix)
    processor = VLAProcessor.from_pretrained(out)
    report = json.loads((out / "conversion_report.json").read_text())
    normalized = normalized_outputs(0)
    for key in statistics:
        robot_type = starvla_resolve_robot_type(data_mix, key)
        expected_modes = [STARVLA_ACTION_MODES[robot_type].get(k, "identity") for k in ACTION_KEYS]
        assert report["normalization_modes"][key]["action"] == expected_modes, (data_mix, key)
        expected = starvla_unapply_actions(normalized, statistics, data_mix, key)
        np.testing.assert_allclose(processor.decode_actions(normalized, unnorm_key=key), expected, rtol=1e-6,
                                   atol=1e-6, err_msg=f"{data_mix}/{key}")  # fmt: skip
    if len(statistics) > 1:  # both refuse to guess the embodiment of a multi-robot run
        with pytest.raises(ValueError, match="unnorm_key"):
            starvla_unapply_actions(normalized, statistics, data_mix)
        with pytest.raises(ValueError, match="several embodiments"):
            processor.decode_actions(normalized)


@pytest.mark.parametrize("data_mix", ["libero_all_q99", "openpi_libero_all"])
def test_libero_q99_data_mixes_decode_with_q99_like_starvla(starvla_run, data_mix):
    """StarVLA registers LIBERO mixtures whose DataConfig normalises xyz/rpy with q99, not min_max
    (examples/simBenchmarks/LIBERO/train_files/data_registry/data_config.py: libero_franka_q99 for libero_all_q99 /
    libero_goal_q99, openpi_libero_franka for openpi_libero_all)."""
    out, statistics = converted(starvla_run, data_mix)
    processor = VLAProcessor.from_pretrained(out)
    report = json.loads((out / "conversion_report.json").read_text())
    normalized = normalized_outputs(1)
    expected = starvla_unapply_actions(normalized, statistics, data_mix)
    got = processor.decode_actions(normalized)
    modes = [STARVLA_ACTION_MODES[STARVLA_MIXTURES[data_mix][0]].get(k, "identity") for k in ACTION_KEYS]
    assert report["normalization_modes"]["franka"]["action"] == modes, (
        f"{data_mix}: converter picked {report['normalization_modes']['franka']['action']} "
        f"({report['action_modes_source']}); StarVLA's DataConfig uses {modes}; decoded actions differ by up to "
        f"{np.abs(got - expected).max():.4f} robot units (per dim {np.abs(got - expected).max(axis=(0, 1)).round(4)})"
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_binary_dimensions_decode_to_the_recorded_range_deliberately(starvla_run):
    """StarVLA's Normalizer.inverse('binary') returns (x > 0.5) as 0 / 1 whatever the dimension's recorded range;
    hf_vla returns the recorded max / min (robot units, as every other mode: README, Normalisation). The two agree
    for the gripper ranges StarVLA's binary DataConfigs record (OXE bridge / RT-1: 0 to 1, tested above); here a
    bridge-style run whose gripper was recorded as -1 / +1, where StarVLA would send 0 for a closed gripper."""
    action = {k: list(v) for k, v in BRIDGE_ACTION.items()}
    for name, value in (("min", -1.0), ("q01", -1.0), ("max", 1.0), ("q99", 1.0), ("mean", 0.0), ("std", 1.0)):
        action[name][-1] = value
    out, statistics = converted(starvla_run, "bridge", action, tag="_pm1_gripper")
    processor = VLAProcessor.from_pretrained(out)
    normalized = normalized_outputs(2)
    expected = starvla_unapply_actions(normalized, statistics, "bridge")
    got = processor.decode_actions(normalized)
    np.testing.assert_allclose(got[..., :6], expected[..., :6], rtol=1e-6, atol=1e-6)  # q99 dims agree
    assert set(np.unique(expected[..., 6])) == {0.0, 1.0}
    np.testing.assert_array_equal(got[..., 6], np.where(normalized[..., 6] > 0.5, 1.0, -1.0))
    np.testing.assert_array_equal(got[..., 6] > 0, expected[..., 6] > 0)  # the same open / closed decisions


# =============================================================================================== 2. state normalisation


def raw_states(state_stats):
    """Raw robot states [3, S]: inside [q01, q99], then past both ends (where q99 clamps), gripper-like values on
    both sides of 0.5. A dimension recorded as constant (bridge's pad: q01 == q99 == 0) keeps its constant."""
    q01, q99 = (np.asarray(state_stats[k], np.float32) for k in ("q01", "q99"))
    span = q99 - q01
    rows = np.stack([q01 + 0.3 * span, q99 + 0.4 * span + 0.1, q01 - 0.4 * span - 0.1])
    rows[:, -1] = [0.3, 0.8, 0.51] if q99[-1] - q01[-1] > 0.5 else rows[:, -1]  # a [0, 1] gripper opening
    return np.where(span != 0, rows, q01).astype(np.float32)


@pytest.mark.parametrize("data_mix", ["libero_goal", "libero_all_q99", "openpi_libero_all", "bridge"])
def test_state_normalisation_matches_starvla_dataloader(starvla_run, data_mix):
    """The converted processor normalises a raw state as the run's DataConfig did when it trained (LIBERO's default
    config leaves the state raw; its q99 / openpi variants and OXE bridge normalise it). hf_vla clamps q99 to
    [-1, 1] where StarVLA clamps to [-2.2, 2.2]: past q01 / q99 the two agree up to that clamp (a report note)."""
    out, statistics = converted(starvla_run, data_mix, tag="_state", include_state=True)
    processor = VLAProcessor.from_pretrained(out)
    report = json.loads((out / "conversion_report.json").read_text())
    (key,) = statistics
    robot_type = starvla_resolve_robot_type(data_mix, key)
    modes = [STARVLA_STATE_MODES[robot_type].get(k, "identity") for k in STARVLA_STATE_KEYS[robot_type]]
    constant = np.equal(statistics[key]["state"]["q01"], statistics[key]["state"]["q99"])
    modes = ["identity" if mode == "q99" and same else mode for mode, same in zip(modes, constant)]  # raw, as q99's
    assert report["normalization_modes"][key]["state"] == modes, (
        f"{data_mix}: converter picked {report['normalization_modes'][key]['state']} "
        f"({report.get('state_modes_source')}); StarVLA's DataConfig uses {modes}"
    )
    assert report["state_modes_source"].startswith("data_mix matches")

    raw = raw_states(statistics[key]["state"])
    images = [libero_example(s, size=64)["image"][: len(processor.camera_names)] for s in range(len(raw))]
    got = processor(images=images, text=[LANG] * len(raw), state=raw)["state"].numpy()
    expected = starvla_apply_state(raw, statistics, data_mix, key)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)  # inside [q01, q99]: identical
    clamped = np.where(np.array(modes) == "q99", np.clip(expected, -1, 1), expected)
    np.testing.assert_allclose(got, clamped, rtol=1e-6, atol=1e-6)
    if set(modes) == {"identity"}:  # LIBERO's default: the raw state, far outside [-1, 1]
        np.testing.assert_array_equal(got, raw)


# ==================================================================================================== 3. wire format


@pytest.fixture(scope="module")
def libero_server(starvla_run):
    out, statistics = converted(starvla_run, "libero_goal")
    policy = VLAPolicy.from_pretrained(out)
    with PolicyServer(policy, port=0, batch_window_ms=0) as server:
        yield server, policy, statistics


def starvla_expected(policy, statistics, example, data_mix="libero_goal"):
    """StarVLA's server: the framework's normalized_actions (same weights, same inputs), un-normalised by the
    reference — [1, T, D]."""
    inputs = policy.processor(images=[list(example["image"])], text=[example["lang"]])
    with torch.no_grad():
        normalized = policy.model.predict_action(**inputs)
    return starvla_unapply_actions(normalized.float().numpy(), statistics, data_mix)


def test_starvla_client_handshake_request_and_reply(libero_server):
    server, policy, statistics = libero_server
    client = StarVLAClient(server.port)
    try:
        meta = client.metadata  # model2libero_interface.py reads these from the handshake; model2robotwin_interface.py
        assert isinstance(meta, dict) and type(meta["action_chunk_size"]) is int and meta["action_chunk_size"] == H
        assert meta["available_unnorm_keys"] == ["franka"] and meta["default_unnorm_key"] == "franka"
        assert isinstance(list(meta.get("vla_obs") or []), list)

        example = libero_example(0)
        query = libero_query(example)
        assert starvla_pack(query) == packb(query)  # both sides frame the same bytes
        response = client.predict_action(query)
        assert (response["status"], response["ok"], response["type"]) == ("ok", True, "inference_result")
        actions = response["data"]["actions"]
        assert isinstance(actions, np.ndarray) and actions.dtype == np.float32 and actions.shape == (1, H, A)
        np.testing.assert_allclose(actions, starvla_expected(policy, statistics, example), rtol=1e-5, atol=1e-5)
        raw_actions = np.asarray(actions)[0]  # (T, D), as the client caches it
        step = raw_actions[2][None]
        raw_action = {"world_vector": step[0, :3], "rotation_delta": step[0, 3:6], "open_gripper": step[0, 6:7]}
        assert [v.shape for v in raw_action.values()] == [(3,), (3,), (1,)]

        # The {"type", "request_id", "payload"} envelope (websocket_policy_server.py, _route_message) and ping.
        wrapped = client.predict_action({"type": "infer", "request_id": "r-1", "payload": libero_query(example)})
        assert (wrapped["status"], wrapped["ok"], wrapped["request_id"]) == ("ok", True, "r-1")
        np.testing.assert_array_equal(wrapped["data"]["actions"], actions)
        named = client.predict_action({**libero_query(example, "franka"), "type": "predict_action"})
        np.testing.assert_array_equal(named["data"]["actions"], actions)
        # examples/simBenchmarks/Robocasa_tabletop/eval_files/model2robocasa_interface.py: several examples in one
        # request (no state), reply read as np.array(response["data"]["actions"]) [B, chunk, D].
        batch = [{"image": libero_example(s, size=224)["image"], "lang": f"{LANG} {s}"} for s in (3, 4)]
        response = client.predict_action({"examples": batch, "do_sample": False, "use_ddim": True,
                                           "num_ddim_steps": 10, "unnorm_key": None})  # fmt: skip
        raw_actions = np.array(response["data"]["actions"])
        assert raw_actions.shape == (2, H, A)
        for b, example in enumerate(batch):
            np.testing.assert_allclose(raw_actions[b : b + 1], starvla_expected(policy, statistics, example),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
        ping = client.predict_action({"type": "ping", "request_id": "p"})
        assert (ping["status"], ping["ok"], ping["type"]) == ("ok", True, "ping")
    finally:
        client.close()


def test_older_starvla_clients_get_normalized_actions(libero_server):
    """Clients written for StarVLA's servers before they un-normalised read `data.normalized_actions` (the
    framework's own output) and un-normalise it themselves; the 2025 ones also send `batch_images` /
    `instructions` instead of `examples`. hf_vla answers both forms with both keys."""
    server, policy, statistics = libero_server
    client = StarVLAClient(server.port)
    try:
        example = libero_example(6, size=224)
        inputs = policy.processor(images=[list(example["image"])], text=[example["lang"]])
        with torch.no_grad():
            framework = policy.model.predict_action(**inputs).float().numpy()  # StarVLA's normalized_actions
        for query in (legacy_query(example), libero_query({"image": example["image"], "lang": example["lang"]})):
            response = client.predict_action(query)
            assert (response["status"], response["ok"]) == ("ok", True), response
            data = response["data"]
            assert data["normalized_actions"].dtype == np.float32 and data["normalized_actions"].shape == (1, H, A)
            np.testing.assert_allclose(data["normalized_actions"], framework, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(data["actions"], starvla_expected(policy, statistics, example), rtol=1e-5,
                                       atol=1e-5)  # fmt: skip
        # LIBERO's min / max dimensions: the old client's own un-normalisation lands on the current server's actions
        # wherever it does not clip
        legacy = legacy_client_unnormalize(data["normalized_actions"][0].copy(), statistics["franka"]["action"])
        inside = np.abs(data["normalized_actions"][0, :, :6]) <= 1
        assert inside.any()
        np.testing.assert_allclose(legacy[:, :6][inside], data["actions"][0, :, :6][inside], rtol=1e-5, atol=1e-5)

        configured = client.predict_action({"type": "configure", "execute_steps": 2})
        assert configured["ok"] is True
        short = client.predict_action(legacy_query(example))["data"]  # cut to the steps the reply holds
        assert short["actions"].shape == short["normalized_actions"].shape == (1, 2, A)
        np.testing.assert_array_equal(short["normalized_actions"], data["normalized_actions"][:, :2])

        bad = [({**legacy_query(example), "instructions": [LANG, LANG]}, "instructions: expected a string or 1"),
               ({**legacy_query(example), "batch_images": [example["image"][:1]]}, "batch_images[0]: expected a list "
                "of 2"), ({**legacy_query(example), "state": np.zeros((2, 8), np.float32)}, "state: expected [1, S]")]
        for query, message in bad:
            reply = client.predict_action(query)
            assert (reply["status"], reply["ok"]) == ("error", False) and message in reply["error"]["message"], reply
        assert client.predict_action(legacy_query(example))["ok"] is True  # still serving
    finally:
        client.close()


def test_error_replies_are_readable_and_the_server_keeps_serving(libero_server):
    server, policy, statistics = libero_server
    client = StarVLAClient(server.port)
    try:
        example = libero_example(1)
        bad = {**example, "image": example["image"][:1]}  # one view for a two-camera model
        for frame in (starvla_pack(libero_query(bad)), starvla_pack({"type": "infer", "request_id": 7,
                                                                     "payload": libero_query(bad)}),
                      starvla_pack(libero_query(example, "no_such_robot")), b"\xc1 not msgpack"):  # fmt: skip
            reply = client.send_frame(frame)  # a binary map (StarVLA's client would raise on a text frame)
            assert isinstance(reply, dict), reply
            # tools/websocket_policy_server.py, _route_message: {"status": "error", "ok": False, "error": {"message"}}
            if "status" in reply:
                assert (reply["status"], reply["ok"]) == ("error", False)
                assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
            else:  # a frame that could not even be read carries no StarVLA marker: openpi's {"error": str}
                assert isinstance(reply["error"], str) and reply["error"]
            with pytest.raises(KeyError):  # what model2libero_interface.py does with any error reply
                reply["data"]["actions"]
        assert client.send_frame(starvla_pack({"type": "infer", "request_id": 7, "payload": libero_query(bad)})
                                 )["request_id"] == 7  # fmt: skip
        good = client.predict_action(libero_query(example))  # same connection, still serving
        np.testing.assert_allclose(good["data"]["actions"], starvla_expected(policy, statistics, example),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    finally:
        client.close()


def test_gripper_post_processing_matches_starvla_clients(libero_server):
    """StarVLA's server returns the gripper as un-normalised (LIBERO: identity) and its clients binarise it
    (eval_libero.py: 1 - 2 (g > 0.5); SimplerEnv WidowX: 2 (g > 0.5) - 1). hf_vla's default reply leaves it alone,
    so an unchanged StarVLA client binarises exactly what StarVLA's server would have sent; hf_vla's optional
    `configure` gripper post-processing reproduces either client's binarisation server-side (a client that already
    binarises must then not do it again)."""
    server, policy, statistics = libero_server
    client = StarVLAClient(server.port)
    try:
        example = libero_example(2)
        expected = starvla_expected(policy, statistics, example)[0]
        plain = client.predict_action(libero_query(example))["data"]["actions"][0]
        np.testing.assert_allclose(libero_env_gripper(plain[:, 6]), libero_env_gripper(expected[:, 6]))
        for env_gripper, low, high in ((libero_env_gripper, 1.0, -1.0), (widowx_env_gripper, -1.0, 1.0)):
            configured = client.predict_action({"type": "configure", "gripper_dims": [6], "gripper_threshold": 0.5,
                                                "gripper_low": low, "gripper_high": high})  # fmt: skip
            assert configured["ok"] is True and configured["action_chunk_size"] == H
            post = client.predict_action(libero_query(example))["data"]["actions"][0]
            np.testing.assert_allclose(post[:, :6], expected[:, :6], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(post[:, 6], env_gripper(expected[:, 6]))
    finally:
        client.close()
