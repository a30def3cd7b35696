"""hf_vla's Meta-World wrapper against LeRobot's Meta-World conventions, from an independent reference.

A policy trained on LeRobot's Meta-World data (`lerobot/metaworld_mt50`) should see in `hf-vla eval metaworld` the
images, state, actions, prompts and episode limits it saw there, and the demonstrations hf_vla writes should load
into LeRobot's Meta-World pipeline. The reference below is our own short code, written from LeRobot 0.4.4 (the
Meta-World env is the same on LeRobot's main branch):

* `src/lerobot/envs/metaworld.py`
  - `MetaworldEnv._make_envs_task`: `metaworld.MT1(task, seed=42)`, env built with `render_mode="rgb_array",
    camera_name="corner2"` and no width/height (so Meta-World's 480 x 480 default), `set_task(train_tasks[0])`,
    `model.cam_pos[2] = [0.75, 0.075, 0.7]`, `reset()`, then `_freeze_rand_vec = False`. No change to
    `model.vis` (MuJoCo's default offscreen multisampling and 4096 shadow map stay on).
  - `MetaworldEnv.render` / `_format_raw_obs`: `np.flip(env.render(), (0, 1))` for corner2;
    `agent_pos = raw_obs[:4]` (float64; `obs_type="pixels_agent_pos"` in the config).
  - `MetaworldEnv.reset`: `env.reset(seed=seed)` (Meta-World ignores that seed), the frame rendered right after.
  - `MetaworldEnv.step`: passes the action unclipped; `is_success = info["success"]`,
    `terminated = done or is_success`; `action_space = Box(-1, 1, (4,), float32)`; `_max_episode_steps =
    env.max_path_length`; `metadata["render_fps"] = 80`; `task_description = TASK_DESCRIPTIONS[task]`.
* `src/lerobot/envs/configs.py` `MetaworldEnv` (env config): fps 80, features_map `pixels -> observation.image`,
  `agent_pos -> observation.state`; `src/lerobot/envs/utils.py` `preprocess_observation`: `agent_pos` -> float32
  `observation.state`, `pixels` (one array) -> `observation.image`.
* `src/lerobot/scripts/lerobot_eval.py` `rollout`: `max_steps = env.call("_max_episode_steps")[0]` (500 for
  Meta-World; the config's `episode_length` is not passed to `create_metaworld_envs`).
* The `lerobot/metaworld_mt50` dataset card (meta/info.json): fps 80, `observation.image` (480 x 480),
  `observation.state` float32 [4], `action` float32 [4].

Frames are compared for the same MuJoCo state: the reference env is frozen to the placement hf_vla drew for a seed and
driven with the same actions, so any pixel difference comes from camera, flip or render settings. The same camera,
flip, state, action handling, success signal and fps hold in both.

hf_vla's defaults differ from LeRobot's on purpose, for CPU evaluation (not asserted; a policy trained on LeRobot's
data is evaluated under LeRobot's settings with `image_size=480, max_steps=500` and `instructions=`): renders
112 x 112 without shadows or multisampling (LeRobot: Meta-World's 480 x 480 with MuJoCo's defaults; mean difference
~8/255 at the same size), ends episodes after 200 steps (LeRobot: 500), phrases its own task instructions, and stores
the camera as `observation.images.corner2` (LeRobot's multi-camera key form; its Meta-World env says
`observation.image`, which `camera_rename` maps when reading such a dataset). Meta-World ignores the seed `reset`
passes, so the same seed number gives different scenes in the two.

Two EGL offscreen contexts with different `model.vis` settings in one process interfere (the older one renders black),
so each test renders hf_vla's frames first and closes that env before it builds a reference env.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from hf_vla.sim import rendering

try:  # MuJoCo picks its GL backend when imported: choose it before metaworld comes in
    rendering.select_gl_backend()
except rendering.RenderingUnavailable as error:  # pragma: no cover - depends on the machine
    pytest.skip(str(error), allow_module_level=True)

metaworld = pytest.importorskip("metaworld", reason="the `sim` extra (metaworld, mujoco) is not installed")
mujoco = pytest.importorskip("mujoco")

from hf_vla.sim import metaworld as hf_mw  # noqa: E402

# ---- LeRobot's conventions (see the module docstring for where each comes from) ----
LEROBOT_CAMERA = "corner2"
LEROBOT_CORNER2_POS = np.array([0.75, 0.075, 0.7])
LEROBOT_FPS = 80
LEROBOT_STATE_KEY, LEROBOT_ACTION_KEY = "observation.state", "action"

TASK = "drawer-open-v3"
SEED = 3
ACTIONS = np.array([[0.3, -0.2, 0.5, 0.7], [-0.4, 0.6, -0.1, -0.9], [0.0, 0.2, -0.3, 0.4]], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def lerobot_benchmark(task: str):
    return metaworld.MT1(task, seed=42)  # (cached: building the benchmark costs ~0.5 s and it is never modified)


def lerobot_reference_env(task: str, size: int, hf_render_settings: bool = False):
    """The Meta-World env as `MetaworldEnv._make_envs_task` builds it (at `size`; LeRobot leaves 480).

    `hf_render_settings` turns multisampling and shadows off as hf_vla does, to compare pixels for orientation alone.
    """
    benchmark = lerobot_benchmark(task)
    env = benchmark.train_classes[task](render_mode="rgb_array", camera_name=LEROBOT_CAMERA, width=size, height=size)
    env.set_task(benchmark.train_tasks[0])
    assert env.model.camera(LEROBOT_CAMERA).id == 2  # LeRobot writes cam_pos[2], meaning corner2
    env.model.cam_pos[2] = LEROBOT_CORNER2_POS
    if hf_render_settings:  # (must precede the first render: the GL context reads them once)
        env.model.vis.global_.offwidth = env.model.vis.global_.offheight = size
        env.model.vis.quality.offsamples = 0
        env.model.vis.quality.shadowsize = 0
    env.reset()
    env._freeze_rand_vec = False
    return env


def lerobot_frame(env) -> np.ndarray:
    """`MetaworldEnv.render`: corner2 frames come out flipped on both axes, and LeRobot flips them back."""
    return np.flip(env.render(), (0, 1))


def lerobot_state(raw_obs: np.ndarray) -> np.ndarray:
    """`_format_raw_obs` keeps `raw_obs[:4]`; `preprocess_observation` turns it into float32 `observation.state`."""
    return np.asarray(raw_obs[:4]).astype(np.float32)


def lerobot_step(env, action):
    """`MetaworldEnv.step` (without its auto-reset): unclipped action, success from info, terminated on success."""
    raw, _reward, done, truncated, info = env.step(np.asarray(action))
    success = bool(info.get("success", 0))
    return raw, success, done or success, truncated


def place_like(env, placement: np.ndarray):
    """Freezes the reference env on the object/goal placement hf_vla drew, then resets it there."""
    env._last_rand_vec = np.array(placement, copy=True)
    env._freeze_rand_vec = True
    raw, _ = env.reset()
    return raw


def hf_rollout(size: int, actions=ACTIONS, task=TASK, seed=SEED):
    """hf_vla's observations for `seed` then `actions`, and the placement it drew (the env is closed after)."""
    with hf_mw.MetaWorldEnv(task, image_size=size, max_steps=50) as env:
        # the camera it renders from, and where that camera sits
        camera_id = mujoco.mj_name2id(env.env.model, mujoco.mjtObj.mjOBJ_CAMERA, LEROBOT_CAMERA)
        assert env.env.mujoco_renderer.camera_id == camera_id
        np.testing.assert_array_equal(env.env.model.cam_pos[camera_id], LEROBOT_CORNER2_POS)
        observations = [env.reset(seed)]
        placement = env.env._last_rand_vec.copy()
        raws = [env._raw.copy()]
        for action in actions:
            observations.append(env.step(action)[0])
            raws.append(env._raw.copy())
    return observations, raws, placement


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---- camera, orientation, image layout ----


def test_camera_name_placement_and_flip_match_lerobot():
    size = 64
    observations, raws, placement = hf_rollout(size)
    hf_frames = [o["images"][hf_mw.CAMERA] for o in observations[1:]]  # after a step: the scene is up to date

    env = lerobot_reference_env(TASK, size, hf_render_settings=True)
    try:
        assert hf_mw.CAMERA == LEROBOT_CAMERA
        place_like(env, placement)
        for action, hf_raw, hf_frame in zip(ACTIONS, raws[1:], hf_frames):
            raw, *_ = lerobot_step(env, action)
            np.testing.assert_array_equal(raw[:18], hf_raw[:18])  # same MuJoCo state (current-frame part of obs)
            reference = lerobot_frame(env)
            assert hf_frame.shape == reference.shape == (size, size, 3)
            assert hf_frame.dtype == reference.dtype == np.uint8
            # pixel-identical: same camera, same cam_pos tweak, same flip of both axes
            np.testing.assert_array_equal(hf_frame, reference)
        # and the comparison can see orientation: any other flip of the same render differs a lot
        raw_render = env.render()
        for name, other in (("none", raw_render), ("vertical only", raw_render[::-1]),
                            ("horizontal only", raw_render[:, ::-1])):  # fmt: skip
            assert mean_abs_difference(other, hf_frames[-1]) > 10, f"flip {name} matches hf_vla's frame"
    finally:
        env.close()


# ---- state, actions, success, episode limit ----


def test_state_and_action_handling_match_lerobot():
    """State = raw_obs[:4] (hand xyz, gripper opening) as float32, step by step. The actions include out-of-range
    ones: LeRobot passes them unclipped (Meta-World clips xyz, MuJoCo's ctrlrange [-1, 1] clamps the gripper), hf_vla
    clips to [-1, 1] first; the next state must not differ."""
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-1, 1, (8, 4)), rng.uniform(-4, 4, (6, 4))]).astype(np.float32)
    observations, raws, placement = hf_rollout(16, actions)
    env = lerobot_reference_env(TASK, 16, hf_render_settings=True)
    try:
        assert env.action_space.shape == (4,)
        np.testing.assert_array_equal(env.action_space.low, -1)
        np.testing.assert_array_equal(env.action_space.high, 1)
        references = [place_like(env, placement)] + [lerobot_step(env, action)[0] for action in actions]
    finally:
        env.close()
    for step, (observation, hf_raw, reference) in enumerate(zip(observations, raws, references)):
        assert observation["state"].dtype == np.float32 and observation["state"].shape == (4,)
        np.testing.assert_array_equal(observation["state"], lerobot_state(reference), err_msg=f"step {step}")
        if step:  # (the reset observation carries stale object entries in both; see test_first_frame_...)
            np.testing.assert_array_equal(hf_raw[:18], reference[:18], err_msg=f"step {step}")
    assert hf_mw.STATE_NAMES == ["hand_x", "hand_y", "hand_z", "gripper"]
    assert hf_mw.ACTION_NAMES == ["dx", "dy", "dz", "gripper"]  # LeRobot's dataset: axes x, y, z, gripper


def test_success_signal_and_termination_match_lerobot():
    """Replays hf_vla's expert episode in the reference: success flags agree step by step, and both end the episode
    at the first success (LeRobot: terminated = done or info["success"])."""
    task = "button-press-topdown-v3"
    with hf_mw.MetaWorldEnv(task, image_size=8, max_steps=150) as env:
        env.reset(SEED)
        placement = env.env._last_rand_vec.copy()
        actions, successes, done = [], [], False
        while not done:
            actions.append(env.expert_action())
            _, success, done = env.step(actions[-1])
            successes.append(success)
    assert successes[-1] and not any(successes[:-1]), "the expert should succeed within 150 steps, once, at the end"
    reference = lerobot_reference_env(task, 8, hf_render_settings=True)
    try:
        place_like(reference, placement)
        for step, (action, success) in enumerate(zip(actions, successes)):
            _, lerobot_success, terminated, _ = lerobot_step(reference, action)
            assert lerobot_success == success and terminated == success, f"step {step}"
    finally:
        reference.close()


# ---- language, dataset layout ----


def test_demonstration_dataset_features_match_lerobot_metaworld(tmp_path):
    hf_mw.generate_demonstrations(tmp_path / "demos", tasks=["reach"], episodes=1, image_size=16,
                                  max_steps=150, video=False, progress=False)  # fmt: skip
    info = json.loads((tmp_path / "demos" / "meta" / "info.json").read_text())
    features = info["features"]
    assert info["fps"] == hf_mw.FPS == LEROBOT_FPS
    for key in (LEROBOT_STATE_KEY, LEROBOT_ACTION_KEY):
        assert features[key]["dtype"] == "float32" and features[key]["shape"] == [4], key
