"""Meta-World environment, expert demonstrations as LeRobot data, and the closed-loop evaluation machinery."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="the `sim` extra (metaworld, mujoco) is not installed")

from hf_vla.data.lerobot import load_lerobot  # noqa: E402
from hf_vla.sim import rendering  # noqa: E402
from hf_vla.sim.evaluation import (  # noqa: E402
    EvalConfig,
    UndecodableChunk,
    add_to_model_card_results,
    evaluate,
    run_episode,
    swapped_instructions,
    wilson_interval,
    write_report,
)
from hf_vla.sim.metaworld import MetaWorldEnv, generate_demonstrations, task_name  # noqa: E402


@pytest.fixture
def no_gl_choice(monkeypatch):
    """Neither variable set, and both restored afterwards (MuJoCo in this process keeps its own backend)."""
    for name in ("MUJOCO_GL", "PYOPENGL_PLATFORM"):
        monkeypatch.setenv(name, "")  # records the original state, so that whatever the test sets is undone
        monkeypatch.delenv(name)
    return monkeypatch


def test_rendering_error_names_the_missing_packages(no_gl_choice):
    monkeypatch = no_gl_choice
    monkeypatch.setattr(rendering.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(rendering.RenderingUnavailable, match="libegl1 .* libosmesa6"):
        rendering.select_gl_backend()


def test_rendering_prefers_egl_and_falls_back_to_osmesa(no_gl_choice):
    monkeypatch = no_gl_choice
    monkeypatch.setattr(rendering.ctypes.util, "find_library", lambda name: "libOSMesa.so" if name == "OSMesa" else None)
    assert rendering.select_gl_backend() == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(rendering.ctypes.util, "find_library", lambda name: f"lib{name}.so")
    assert rendering.select_gl_backend() == "egl"


@pytest.fixture(scope="module")
def drawer_env():
    with MetaWorldEnv("drawer-open-v3", image_size=64, max_steps=150) as env:
        yield env


def test_env_observation_and_seeded_placement(drawer_env):
    obs = drawer_env.reset(0)
    assert obs["instruction"] == "open the drawer" and drawer_env.task == "drawer-open"
    assert obs["images"]["corner2"].shape == (64, 64, 3) and obs["images"]["corner2"].dtype == np.uint8
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    again = drawer_env.reset(0)["images"]["corner2"]
    other = drawer_env.reset(1)["images"]["corner2"]
    np.testing.assert_array_equal(obs["images"]["corner2"], again)
    assert np.abs(other.astype(int) - again.astype(int)).mean() > 0.1  # the seed moves the drawer


def test_env_rejects_bad_actions(drawer_env):
    drawer_env.reset(0)
    with pytest.raises(ValueError, match=r"action: expected shape \[4\].*got \[7\]"):
        drawer_env.step(np.zeros(7))
    with pytest.raises(ValueError, match="action: expected finite values"):
        drawer_env.step(np.array([0, np.nan, 0, 0]))
    with pytest.raises(ValueError, match="unknown Meta-World task 'drawer-opne'"):
        MetaWorldEnv("drawer-opne")
    with pytest.raises(ValueError, match=r"max_steps: expected 1..500 \(Meta-World's episode limit\), got 501"):
        MetaWorldEnv("drawer-open", image_size=16, max_steps=501)
    with pytest.raises(ValueError, match="image_size: expected a positive integer, got 0"):
        MetaWorldEnv("drawer-open", image_size=0)


def test_expert_succeeds_and_zero_actions_do_not(drawer_env):
    config = EvalConfig(max_steps=150)

    def expert(obs):
        return drawer_env.expert_action()[None]

    success, steps = run_episode(drawer_env, expert, seed=10_000, config=config, instruction="open the drawer")
    assert success and steps < 150
    success, steps = run_episode(drawer_env, lambda obs: np.zeros((4, 4)), 10_000, config, "open the drawer")
    assert not success and steps == 150


def test_generated_demonstrations_are_a_lerobot_dataset(tmp_path):
    summary = generate_demonstrations(tmp_path / "demos", tasks=["drawer-open", "faucet-close"], episodes=2,
                                      image_size=56, progress=False)  # fmt: skip
    assert {t: s["episodes"] for t, s in summary["tasks"].items()} == {"drawer-open": 2, "faucet-close": 2}
    data = load_lerobot(tmp_path / "demos", action_horizon=8, camera_rename={"observation.images.corner2": "corner2"})
    assert len(data) == summary["frames"] and data.num_episodes == 4 and data.fps == 80
    info = json.loads((tmp_path / "demos" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["features"]["observation.images.corner2"]["dtype"] == "video"
    instructions = {data[i]["instruction"] for i in range(len(data))}
    assert instructions == {"open the drawer", "close the faucet"}
    sample = data[len(data) - 1]
    assert sample["images"]["corner2"].shape == (56, 56, 3) and sample["actions"].shape == (8, 4)
    assert np.abs(data._actions).max() <= 1.0
    # each kept episode ends in success: replaying its actions from its seed succeeds again
    with MetaWorldEnv("drawer-open", image_size=56) as env:
        first = data.episodes[0]
        obs, succeeded = env.reset(0), False
        for action in data._actions[: first["length"]]:
            obs, success, _ = env.step(action)
            succeeded |= success
        assert succeeded
        np.testing.assert_allclose(obs["state"], data._states[first["length"] - 1], atol=0.05)


def test_hf_vla_generate_writes_what_train_vla_reads_and_refuses_a_non_empty_folder(tmp_path, capsys):
    """`hf-vla generate metaworld` → the Meta-World recipe trains on it as written (camera, statistics key, action
    width, instructions) → the model predicts for one of its frames. An existing non-empty output folder (a dataset,
    or anything else) is refused in one line and left as it was, instead of a traceback or a mixed folder."""
    import importlib.util

    from hf_vla import VLAPolicy
    from hf_vla.cli import main as cli

    out = tmp_path / "demos"
    generate = ["generate", "metaworld", str(out), "--tasks", "drawer-open", "--episodes", "1", "--image-size", "32"]
    assert cli(generate) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["drawer-open"]["episodes"] == 1
    data = load_lerobot(out, action_horizon=8, camera_rename={"observation.images.corner2": "corner2"})
    assert data.fps == 80 and data.camera_names == ["corner2"] and data[0]["instruction"] == "open the drawer"
    assert (data[0]["state"].shape, data[0]["actions"].shape) == ((4,), (8, 4))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for folder in (out, tmp_path / "notes"):
        before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
        with pytest.raises(SystemExit) as exit_info:
            cli([*generate[:2], str(folder), *generate[3:]])
        assert exit_info.value.code == 2 and sorted(path.relative_to(folder) for path in folder.rglob("*")) == before
        assert capsys.readouterr().err == (f"hf-vla generate: {folder} exists and is not an empty folder; remove it or "
                                           "choose another output folder (demonstrations are written into a new or "
                                           "empty one only)\n")

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_vla", root / "trainers" / "train_vla.py")
    train_vla = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_vla)
    model_dir = tmp_path / "model"
    train_vla.main([str(root / "trainers" / "recipes" / "metaworld.yaml"), "--data.lerobot", str(out),
                    "--trainer.output_dir", str(model_dir), "--trainer.max_steps", "1", "--trainer.save_strategy", "no",
                    "--trainer.per_device_train_batch_size", "2", "--trainer.disable_tqdm", "true",
                    "--model.image_size", "[32, 32]"])  # fmt: skip
    policy = VLAPolicy.from_pretrained(str(model_dir))
    stats = policy.processor.norm_stats["metaworld"]
    assert policy.processor.camera_names == ["corner2"] and list(policy.processor.norm_stats) == ["metaworld"]
    assert (policy.model.config.action_dim, policy.model.config.state_dim) == (4, 0) and "state" not in stats
    assert stats["action"]["mode"] == ["min_max"] * 4 and stats["num_transitions"] == len(data)
    np.testing.assert_allclose(stats["action"]["max"], data._actions.max(axis=0), rtol=1e-6)
    frame = data[5]
    chunk = policy.predict({"images": frame["images"], "instruction": frame["instruction"]})
    assert chunk.shape == (8, 4) and np.isfinite(chunk).all()


def test_wilson_interval_matches_the_closed_form():
    for k, n in [(0, 10), (7, 10), (20, 20), (45, 80)]:
        p, z = k / n, 1.959963984540054
        centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        expected = ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))
        np.testing.assert_allclose(wilson_interval(k, n), expected, atol=1e-9)


def test_evaluate_writes_report_plot_and_video(tmp_path, monkeypatch):
    import av

    config = EvalConfig(tasks=["drawer-open"], episodes=2, max_steps=12, image_size=56, blank_image=True,
                        video_dir=str(tmp_path / "videos"), instructions={"drawer-open": "close the drawer"})  # fmt: skip
    seen, seeds, reset = [], [], MetaWorldEnv.reset
    monkeypatch.setattr(MetaWorldEnv, "reset", lambda env, seed: seeds.append(seed) or reset(env, seed))

    def policy(obs):
        seen.append(obs)
        return np.zeros((8, 4), np.float32)

    report = evaluate(policy, config, progress=False)
    row = report["tasks"]["drawer-open"]
    assert row["successes"] == 0 and row["episodes"] == 2 and row["ci95"][0] == 0.0 and row["ci95"][1] > 0.5
    assert report["env_steps"] == 24 and len(seen) == 6  # 12 steps, 4 executed per chunk, two episodes
    assert all(not obs["images"]["corner2"].any() for obs in seen)  # blanked
    assert seeds == [config.seed, config.seed + 1]  # one unseen placement per episode
    assert {obs["instruction"] for obs in seen} == {"close the drawer"} and row["instruction"] == "close the drawer"
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["report"].read_text())["average"]["episodes"] == 2
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    with av.open(str(tmp_path / "videos" / "drawer-open.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 13  # the first frame and one per step

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    add_to_model_card_results(report, model_dir, suffix=" (image blanked)")
    saved = json.loads((model_dir / "eval_results.json").read_text())["tasks"]
    assert saved["metaworld/drawer-open (image blanked)"]["episodes"] == 2


def test_an_undecodable_chunk_fails_its_episode_not_the_evaluation(drawer_env):
    calls = []

    def policy(obs):  # the second chunk of the first episode does not decode (FAST marks it with NaN)
        calls.append(len(calls))
        return np.full((4, 4), np.nan if len(calls) == 2 else 0.0, np.float32)

    with pytest.raises(UndecodableChunk, match=r"policy: the action chunk holds NaN or inf") as error:
        run_episode(drawer_env, policy, 0, EvalConfig(), "open the drawer")
    assert error.value.steps == 4  # the first chunk ran
    calls.clear()
    config = EvalConfig(tasks=["drawer-open"], episodes=2, max_steps=12, image_size=56)
    report = evaluate(policy, config, progress=False)
    row = report["tasks"]["drawer-open"]
    assert (row["successes"], row["episodes"], row["undecodable_episodes"]) == (0, 2, 1)
    assert report["env_steps"] == 4 + 12 and len(calls) == 2 + 3  # the second episode ran in full

    def server_like(obs):  # ServerPolicy raises it from hf-vla serve's error reply: the steps still count
        calls.append(len(calls))
        if len(calls) == 3:
            raise UndecodableChunk("actions: the model's output for sample(s) [0] is not a valid action chunk")
        return np.zeros((4, 4), np.float32)

    calls.clear()
    with pytest.raises(UndecodableChunk) as error:
        run_episode(drawer_env, server_like, 0, EvalConfig(), "open the drawer")
    assert error.value.steps == 8
    calls.clear()
    report = evaluate(server_like, config, progress=False)
    assert report["average"]["undecodable_episodes"] == 1 and report["env_steps"] == 8 + 12


def test_policy_returning_a_wrong_shape_is_reported(drawer_env):
    for shape in ((8, 7), (0, 4)):  # an empty chunk would never step the environment, nor end the episode
        with pytest.raises(ValueError, match=rf"policy: expected an action chunk \[T ≥ 1, 4\], got shape \[{shape[0]}, {shape[1]}\]"):
            run_episode(drawer_env, lambda obs: np.zeros(shape), 0, EvalConfig(), "open the drawer")


def test_evaluation_settings_that_would_hang_lose_results_or_be_ignored_are_refused():
    never_called = lambda obs: pytest.fail("no episode should run")  # noqa: E731
    cases = [
        (dict(tasks=["reach", "reach-v3"]), r"tasks: \['reach'\] listed more than once"),
        (dict(tasks=["reach", "drawer-opne"]), r"tasks: unknown Meta-World task\(s\) \['drawer-opne'\]; known"),
        (dict(tasks=["reach"], episodes=0), "episodes: expected a positive integer, got 0"),
        (dict(tasks=["reach"], execute_steps=0), "execute_steps: expected a positive integer, got 0"),
        (dict(tasks=["reach"], seed=-1), "seed: expected a non-negative integer, got -1"),
        (dict(tasks=["reach"], instructions={"reahc": "go"}), r"instructions: \['reahc'\] are not among"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate(never_called, EvalConfig(**settings), progress=False)
    with pytest.raises(ValueError, match=r"swapping instructions needs at least two tasks, got \['reach'\]"):
        swapped_instructions(["reach"])
    with pytest.raises(ValueError, match=r"tasks: \['reach'\] listed more than once"):
        generate_demonstrations("/nonexistent", tasks=["reach", "reach_v3"], episodes=1, progress=False)
    with pytest.raises(ValueError, match=r"tasks: unknown Meta-World task\(s\) \['reahc'\]"):  # before any episode
        generate_demonstrations("/nonexistent", tasks=["reach", "reahc"], episodes=1, progress=False)


def test_execute_steps_beyond_the_policy_chunk_is_refused_not_capped():
    from hf_vla import VLAPolicy
    from hf_vla.defaults import default_model_dir
    from hf_vla.serving import PolicyServer
    from hf_vla.sim.evaluation import InProcessPolicy, ServerPolicy

    policy = VLAPolicy.from_pretrained(default_model_dir())  # action_horizon 8
    message = r"execute_steps: expected 1..8 \(the policy's action chunk length\), got 9"
    with pytest.raises(ValueError, match=message):
        evaluate(InProcessPolicy(policy), EvalConfig(tasks=["reach"], execute_steps=9), progress=False)
    with PolicyServer(policy, port=0) as server:
        remote = ServerPolicy(f"ws://127.0.0.1:{server.port}")
        try:
            with pytest.raises(ValueError, match=message):
                evaluate(remote, EvalConfig(tasks=["reach"], execute_steps=9), progress=False)
        finally:
            remote.close()


def test_hf_vla_eval_reports_bad_model_server_and_execute_steps_in_one_line(tmp_path, capsys):
    import socket

    from hf_vla.cli import main
    from hf_vla.defaults import default_model_dir

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    common = ["--tasks", "drawer-open", "--episodes", "1", "--no-video", "--out", str(tmp_path)]
    for argv, message in [
        (["--model", "/nonexistent/model"], "hf-vla eval: --model: no such directory '/nonexistent/model'"),
        (["--model", "no-such-model"], "hf-vla eval: --model: cannot load 'no-such-model': We couldn't connect"),
        (["--server", f"ws://127.0.0.1:{free}"], f"hf-vla eval: --server: cannot connect to 'ws://127.0.0.1:{free}': "),
        (["--model", default_model_dir(), "--execute-steps", "99"],
         "hf-vla eval: execute_steps: expected 1..8 (the policy's action chunk length), got 99"),
        # --add-to-card writes into a local model directory: refused before connecting or loading, not after the
        # whole evaluation has run
        (["--server", f"ws://127.0.0.1:{free}", "--add-to-card"],
         f"hf-vla eval: --add-to-card: expected --model to name a local model directory (its eval_results.json is "
         f"updated), got --server ws://127.0.0.1:{free}"),
        (["--model", "org/no-such-model", "--add-to-card"],
         "hf-vla eval: --add-to-card: expected --model to name a local model directory (its eval_results.json is "
         "updated), got --model 'org/no-such-model' (not a local directory)"),
    ]:
        with pytest.raises(SystemExit) as excinfo:
            main(["eval", "metaworld", *argv, *common])
        error = capsys.readouterr().err
        assert excinfo.value.code == 2 and "Traceback" not in error and error.startswith(message), (argv, error)
        if argv[0] == "--server" and len(argv) == 2:  # refused: the README's `hf-vla serve ... &` may still be loading
            assert f"wait until http://127.0.0.1:{free}/healthz answers" in error, error
    assert not (tmp_path / "report.json").exists()


def test_swapped_instructions_and_task_names():
    assert swapped_instructions(["faucet-open", "faucet-close-v3"]) == {
        "faucet-open": "close the faucet",
        "faucet-close": "open the faucet",
    }
    assert task_name("drawer_open-v3") == "drawer-open"


def test_embedded_default_model_is_a_trained_policy():
    """`make demo` and the Space run a policy, not random weights: it solves unseen Meta-World episodes."""
    from hf_vla.defaults import default_model_dir
    from hf_vla.sim.evaluation import InProcessPolicy

    policy = InProcessPolicy(default_model_dir())
    report = evaluate(policy, EvalConfig(tasks=["drawer-open", "faucet-close"], episodes=3, seed=30_000), progress=False)
    assert report["average"]["successes"] >= 5, report["tasks"]
    results = json.loads((Path(default_model_dir()) / "eval_results.json").read_text())["tasks"]
    assert results["metaworld/drawer-open"]["episodes"] >= 20


def test_train_metaworld_reuses_demonstrations_only_for_the_same_request(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "trainers" / "train_metaworld.py"
    spec = importlib.util.spec_from_file_location("train_metaworld", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    def fake_generate(data, tasks, episodes):  # stands in for the scripted experts
        calls.append((list(tasks), episodes))
        (data / "meta").mkdir(parents=True)
        (data / "meta" / "info.json").write_text("{}")
        return {"episodes": episodes}

    data = tmp_path / "demos"
    assert script.ensure_demonstrations(data, ["drawer-open", "door-open"], 3, fake_generate) == {"episodes": 3}
    assert script.ensure_demonstrations(data, ["door-open", "drawer-open"], 3, fake_generate) is None  # reused
    assert len(calls) == 1
    for tasks, episodes in ((["door-open"], 3), (["drawer-open", "door-open"], 25)):
        with pytest.raises(SystemExit, match=r"holds demonstrations for .*'episodes': 3.*pass another --data"):
            script.ensure_demonstrations(data, tasks, episodes, fake_generate)
    (data / script.DEMONSTRATIONS_REQUEST).unlink()  # a folder from elsewhere: what it holds is unknown
    with pytest.raises(SystemExit, match="a request it does not record"):
        script.ensure_demonstrations(data, ["drawer-open", "door-open"], 3, fake_generate)


def test_train_metaworld_skip_training_evaluates_without_demonstrations(tmp_path, monkeypatch, capsys):
    """`--skip-training` evaluates an existing --output model: it neither generates demonstrations (minutes of
    scripted experts for the defaults) nor refuses a --data folder made for another request."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "trainers" / "train_metaworld.py"
    spec = importlib.util.spec_from_file_location("train_metaworld", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    class Evaluating(Exception):
        pass

    def load_policy(model_dir, option):
        raise Evaluating(f"{option} {model_dir}")

    monkeypatch.setattr(script, "ensure_demonstrations",
                        lambda *args, **kwargs: pytest.fail("--skip-training touched the demonstrations"))  # fmt: skip
    monkeypatch.setattr(script, "load_policy", load_policy)
    with pytest.raises(Evaluating, match="--output .*my_model"):
        script.main(["--skip-training", "--output", str(tmp_path / "my_model"), "--data", str(tmp_path / "none")])
    with pytest.raises(SystemExit):  # train_vla.py overrides mean nothing without training: refused, not dropped
        script.main(["--skip-training", "--output", str(tmp_path / "my_model"), "--trainer.seed", "1"])
    assert "--skip-training: train_vla.py overrides ['--trainer.seed', '1'] would be ignored" in capsys.readouterr().err


def test_a_sampling_policy_repeats_its_episodes_whatever_ran_before():
    """A flow-matching head draws its starting noise from torch's global generator: without seeding it from each
    episode's seed, evaluating twice (or a task after another, or an ablation beside the standard run) gives other
    actions and other results for the same seeds."""
    import random

    import torch

    from hf_vla import VLAPolicy
    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla("gr00t", action_dim=4, state_dim=4)
    flow = VLAPolicy(model, processor)
    chunks = []

    def policy(obs):  # the Meta-World camera as both of the tiny model's views
        view = obs["images"]["corner2"]
        chunk = flow.predict({**obs, "images": {"primary": view, "wrist": view}})
        chunks.append(chunk)
        return np.clip(chunk, -1, 1)

    config = EvalConfig(tasks=["drawer-open"], episodes=2, max_steps=8, image_size=56)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    evaluate(policy, config, progress=False)
    first, chunks[:] = list(chunks), []
    evaluate(policy, config, progress=False)
    assert len(first) == len(chunks) == 4
    for a, b in zip(first, chunks):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], first[2])  # the noise differs between episodes: each has its own seed
    chunks.clear()
    evaluate(policy, EvalConfig(tasks=["drawer-open"], episodes=1, seed=config.seed + 1, max_steps=8, image_size=56),
             progress=False)  # fmt: skip
    np.testing.assert_array_equal(chunks[0], first[2])  # episode seed + 1 alone acts as it did after episode seed
    # the caller's generators are as they were (a training run that evaluates keeps its random stream)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_hf_vla_eval_reports_a_server_refusal_in_one_line(tmp_path, capsys):
    """A request the server refuses (here an unknown --unnorm-key) is bad input, reported as `--model` reports it,
    not a ServerError traceback."""
    from hf_vla import VLAPolicy
    from hf_vla.cli import main
    from hf_vla.defaults import default_model_dir
    from hf_vla.serving import PolicyServer

    with PolicyServer(VLAPolicy.from_pretrained(default_model_dir()), port=0) as server:
        uri = f"ws://127.0.0.1:{server.port}"
        with pytest.raises(SystemExit) as excinfo:
            main(["eval", "metaworld", "--server", uri, "--unnorm-key", "mars", "--tasks", "drawer-open",
                  "--episodes", "1", "--max-steps", "4", "--image-size", "32", "--no-video", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert excinfo.value.code == 2 and "Traceback" not in error, error
    message = f"hf-vla eval: --server: {uri} answered with an error: unnorm_key: unknown key 'mars'"
    assert message in error.splitlines()[-1], error  # after the progress bar's \r
    assert not (tmp_path / "report.json").exists()


def test_an_episode_that_succeeds_mid_chunk_stops_there_and_counts(drawer_env):
    """The expert's actions replayed as open-loop chunks: the success lands inside a chunk, whose remaining actions
    are not executed, and the episode counts as a success of exactly that many steps."""
    obs, actions, success = drawer_env.reset(10_000), [], False
    while not success:
        actions.append(drawer_env.expert_action())
        obs, success, done = drawer_env.step(actions[-1])
        assert not done or success, "the expert should open the drawer within the step limit"
    succeeded_at = len(actions)
    horizon = 7 if succeeded_at % 7 else 8  # the success falls strictly inside a chunk
    calls = []

    def replay(obs):
        start = horizon * len(calls)
        calls.append(start)
        chunk = np.zeros((horizon, 4), np.float32)
        rest = np.asarray(actions[start : start + horizon])
        chunk[: len(rest)] = rest
        return chunk

    config = EvalConfig(tasks=["drawer-open"], episodes=1, seed=10_000, execute_steps=horizon, max_steps=150,
                        image_size=64)  # fmt: skip
    assert run_episode(drawer_env, replay, 10_000, config, "open the drawer") == (True, succeeded_at)
    assert drawer_env.steps == succeeded_at and len(calls) == -(-succeeded_at // horizon)
    calls.clear()
    row = evaluate(replay, config, progress=False)["tasks"]["drawer-open"]
    assert (row["successes"], row["episodes"], row["mean_episode_steps"]) == (1, 1, succeeded_at)
    assert row["success_rate"] == 1.0 and row["ci95"] == [round(wilson_interval(1, 1)[0], 6), 1.0]


def test_chunks_are_executed_in_order_up_to_execute_steps_and_the_step_limit(drawer_env, monkeypatch):
    """execute_steps k < T: the first k actions of each chunk, in order, then a new chunk from the new observation;
    the last chunk is cut at max_steps (10 steps = 3 + 3 + 3 + 1) and the environment never steps past it."""
    executed, step = [], MetaWorldEnv.step

    def recording_step(env, action):
        executed.append(np.array(action))
        return step(env, action)

    monkeypatch.setattr(MetaWorldEnv, "step", recording_step)
    observed = []

    def policy(obs):  # action i of chunk c: [c / 10, i / 10, 0, 0]
        observed.append(obs["state"])
        chunk = np.zeros((8, 4), np.float32)
        chunk[:, 0], chunk[:, 1] = len(observed) / 10, np.arange(8) / 10
        return chunk

    config = EvalConfig(execute_steps=3, max_steps=10)
    drawer_env.max_steps = 10
    try:
        assert run_episode(drawer_env, policy, 0, config, "open the drawer") == (False, 10)
    finally:
        drawer_env.max_steps = 150
    expected = [[c / 10, i / 10] for c in (1, 2, 3) for i in range(3)] + [[0.4, 0.0]]
    np.testing.assert_allclose(np.array(executed)[:, :2], expected, atol=1e-6)
    assert len(observed) == 4 and not np.allclose(observed[0], observed[1])  # each chunk sees the state it acts from


def test_actions_outside_the_action_space_are_clipped_to_it(drawer_env):
    """Meta-World's actions lie in [-1, 1]; a policy's larger values act as the bound, neither refused nor scaled
    (the wrapper clips them; Meta-World clips the motion and MuJoCo the gripper command on their own too)."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (12, 4)).astype(np.float32)
    actions[::2] *= 6  # every other action far outside the box
    trajectories = []
    for chunk in (actions, np.clip(actions, -1, 1)):
        drawer_env.reset(3)
        trajectories.append(np.stack([drawer_env.step(a)[0]["state"] for a in chunk]))
    np.testing.assert_array_equal(trajectories[0], trajectories[1])
    assert np.abs(trajectories[0][-1] - trajectories[0][0]).max() > 0.01  # the actions did move the hand


def test_eval_results_read_back_by_the_model_card_as_written(tmp_path):
    """What `--add-to-card` merges into eval_results.json (beside the training run's held-out metrics) is what the
    card tabulates: the same rates, episode counts and Wilson intervals, 0/n and n/n included."""
    from scipy.stats import binomtest

    from hf_vla.hub.card import _evaluation
    from hf_vla.sim.evaluation import TaskResult

    counts = {"drawer-open": (0, 5), "door-open": (5, 5), "reach": (3, 7)}
    rows = {task: TaskResult(task, "do it", successes=k, episodes=n, steps=[10] * n).as_dict()
            for task, (k, n) in counts.items()}  # fmt: skip
    (tmp_path / "eval_results.json").write_text(json.dumps({"epoch": 2.0, "eval_action_l1": 0.0123}))
    add_to_model_card_results({"tasks": rows}, tmp_path)
    add_to_model_card_results({"tasks": {"reach": rows["reach"]}}, tmp_path, suffix=" (image blanked)")
    table, held_out = _evaluation(tmp_path / "eval_results.json")
    assert held_out == [("action_l1", 0.0123)]
    assert [row["task"] for row in table] == [f"metaworld/{t}" for t in counts] + ["metaworld/reach (image blanked)"]
    for row, (k, n), written in zip(table, [*counts.values(), counts["reach"]], [*rows.values(), rows["reach"]]):
        interval = binomtest(k, n).proportion_ci(0.95, method="wilson")
        np.testing.assert_allclose(written["ci95"], [interval.low, interval.high], atol=5e-5)
        low, high = written["ci95"]
        assert row["success_rate"] == round(k / n, 4) and row["episodes"] == n
        assert row["interval"] == f"{100 * low:.1f}–{100 * high:.1f}%"
        assert row["interval"] == f"{100 * interval.low:.1f}–{100 * interval.high:.1f}%"  # rounded once (0/5: 43.4%)
    assert table[0]["interval"].startswith("0.0–") and table[1]["interval"].endswith("–100.0%")


def test_hf_vla_eval_add_to_card_merges_the_reported_rows_and_repeats(tmp_path, capsys):
    """`hf-vla eval ... --add-to-card` on a local model: report.json and the merged eval_results.json row hold the
    same numbers, the rows already there stay, and the same command run again reports the same episodes."""
    import shutil

    from hf_vla.cli import main
    from hf_vla.defaults import default_model_dir

    model = shutil.copytree(default_model_dir(), tmp_path / "model")
    before = json.loads((model / "eval_results.json").read_text())["tasks"]
    reports = []
    for run in ("first", "second"):
        argv = ["eval", "metaworld", "--model", str(model), "--tasks", "drawer-open", "--episodes", "2",
                "--max-steps", "6", "--image-size", "32", "--blank-image", "--no-video", "--out", str(tmp_path / run),
                "--add-to-card"]  # fmt: skip
        assert main(argv) == 0
        reports.append(json.loads((tmp_path / run / "report.json").read_text()))
    out = capsys.readouterr().out
    assert f"updated {model / 'eval_results.json'}" in out and "drawer-open" in out
    first, second = reports
    assert first["condition"] == "image blanked" and first["settings"]["blank_image"] is True
    assert first["tasks"] == second["tasks"] and first["env_steps"] == second["env_steps"] == 12
    row = first["tasks"]["drawer-open"]
    saved = json.loads((model / "eval_results.json").read_text())["tasks"]
    assert saved["metaworld/drawer-open (image blanked)"] == {k: row[k] for k in ("success_rate", "episodes", "ci95")}
    standard = {name: row for name, row in before.items() if "(" not in name}
    assert standard and {name: saved[name] for name in standard} == standard  # an ablation leaves them as they were


def test_a_server_reply_without_actions_is_named():
    """A third-party server answering in another shape: the error says what came back, not a KeyError."""
    from types import SimpleNamespace

    from hf_vla.serving.client import ServerError
    from hf_vla.sim.evaluation import ServerPolicy

    policy = object.__new__(ServerPolicy)  # no connection: the client is a stand-in
    obs = {"images": {"corner2": np.zeros((8, 8, 3), np.uint8)}, "instruction": "go", "state": None}
    policy.unnorm_key = None
    for reply, got in (({"action": [[0.0] * 4]}, r"\['action'\]"), ([[0.0] * 4], "list")):
        policy.client = SimpleNamespace(infer=lambda request, reply=reply: reply)
        with pytest.raises(ServerError, match=rf"expected a reply with 'actions' \[T, D\], got {got}"):
            policy(obs)
    policy.client = SimpleNamespace(infer=lambda request: {"actions": np.ones((2, 4))})
    np.testing.assert_array_equal(policy(obs), np.ones((2, 4)))
