"""The whole loop in small: Meta-World expert demonstrations → LeRobot dataset → train_vla.py → closed-loop success.

Two tasks, a few minutes of CPU training, 10 unseen episodes each. Zero and random actions score 0 on these tasks, and
a model whose training or inference path is broken (wrong normalisation, images or instructions not reaching the
head, chunks executed out of order) cannot reach the threshold either. The same model is then rolled out through the
policy server and a websocket client, which must reproduce the in-process actions.

The demonstrations and the training run in one child process that conftest starts as soon as tests needing the
trained model are collected, and those tests run last: the rest of the suite is single-threaded, so the child trains
on the core the other tests leave free instead of holding the whole suite up for minutes.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="the `sim` extra (metaworld, mujoco) is not installed")

from hf_vla.sim.evaluation import EvalConfig, InProcessPolicy, ServerPolicy, evaluate  # noqa: E402
from hf_vla.sim.metaworld import MetaWorldEnv, generate_demonstrations  # noqa: E402
from hf_vla.serving.client import ServerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("door-open", "drawer-open")
DEMOS_PER_TASK = 25
TRAIN_STEPS = 700
EPISODES = 10
THRESHOLD = 0.6  # average success over both tasks; zero and random actions score 0
PIPELINE_TIMEOUT = 1800  # seconds from its start: demonstrations (~1-2 min) and training (~3-5 min on one core)
_pipeline = {}  # the running child: process, output directory, log, start time


def prepare_trained_model(root: Path):
    """Demonstrations, then train_vla.py, in a child process (this file run as a script); returns at once."""
    log = open(root / "pipeline.log", "w")  # a file, not a pipe: nobody reads the child's output while it runs
    process = subprocess.Popen([sys.executable, __file__, str(root)], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    _pipeline.update(process=process, output=root / "model", log=log, start=time.monotonic())


def _kill_pipeline():
    """Kills the child and the train_vla.py process it started (its own session: one process group)."""
    process = _pipeline["process"]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stop_pipeline():
    """Kills a child still running at the end of the session (its tests failed early, or the run was stopped)."""
    if _pipeline:
        if _pipeline["process"].poll() is None:
            _kill_pipeline()
        _pipeline["log"].close()


def _run_pipeline(root: Path):
    import threading

    def exit_with_the_test_run(parent=os.getppid()):  # a killed pytest leaves no training behind
        while os.getppid() == parent:
            time.sleep(2)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=exit_with_the_test_run, daemon=True).start()
    generate_demonstrations(root / "demos", tasks=TASKS, episodes=DEMOS_PER_TASK, progress=False)
    command = [sys.executable, str(ROOT / "trainers" / "train_vla.py"), str(ROOT / "trainers/recipes/metaworld.yaml"),
               "--data.lerobot", str(root / "demos"), "--trainer.output_dir", str(root / "model"),
               "--trainer.max_steps", str(TRAIN_STEPS), "--trainer.save_steps", "100000",
               "--trainer.logging_steps", "100", "--trainer.disable_tqdm", "true"]  # fmt: skip
    subprocess.run(command, check=True, timeout=1200)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    if not _pipeline:  # conftest starts it when the session's tests are collected
        prepare_trained_model(tmp_path_factory.mktemp("closed_loop"))
    process = _pipeline["process"]
    try:
        process.wait(timeout=max(1.0, PIPELINE_TIMEOUT - (time.monotonic() - _pipeline["start"])))
    except subprocess.TimeoutExpired:
        _kill_pipeline()
    log = Path(_pipeline["log"].name).read_text()
    assert process.returncode == 0, f"demonstrations + training failed or ran past {PIPELINE_TIMEOUT} s:\n{log[-6000:]}"
    return _pipeline["output"]


def test_trained_policy_succeeds_in_closed_loop(trained_model):
    policy = InProcessPolicy(str(trained_model))
    report = evaluate(policy, EvalConfig(tasks=TASKS, episodes=EPISODES), progress=False)
    rates = {task: row["success_rate"] for task, row in report["tasks"].items()}
    print(f"closed-loop success after {TRAIN_STEPS} steps: {rates}")
    assert report["average"]["success_rate"] >= THRESHOLD, rates


@pytest.mark.parametrize("baseline", ["zero", "random"])
def test_baselines_score_nothing(baseline):
    rng = np.random.default_rng(0)

    def policy(obs):
        return np.zeros((4, 4)) if baseline == "zero" else rng.uniform(-1, 1, size=(4, 4))

    report = evaluate(policy, EvalConfig(tasks=TASKS, episodes=2, max_steps=150), progress=False)
    assert report["average"]["successes"] == 0


def test_served_policy_reproduces_in_process_actions(trained_model):
    from hf_vla import VLAPolicy
    from hf_vla.serving.server import PolicyServer

    local = InProcessPolicy(str(trained_model))
    with PolicyServer(VLAPolicy.from_pretrained(str(trained_model)), port=0) as server:
        remote = ServerPolicy(f"ws://127.0.0.1:{server.port}")
        try:
            assert remote.metadata["action_chunk_size"] == 8 and remote.metadata["cameras"] == ["corner2"]
            with MetaWorldEnv(TASKS[0]) as env:
                obs = env.reset(10_000)
                for _ in range(3):
                    expected, served = local(obs), remote(obs)
                    np.testing.assert_allclose(served, expected, atol=1e-5)
                    for action in served[:4]:
                        obs, _, _ = env.step(action)
            report = evaluate(remote, EvalConfig(tasks=TASKS[:1], episodes=2), progress=False)
            assert report["tasks"][TASKS[0]]["episodes"] == 2
            keyed = ServerPolicy(f"ws://127.0.0.1:{server.port}", unnorm_key="mars")  # --unnorm-key reaches the server
            with pytest.raises(ServerError, match=r"unnorm_key: unknown key 'mars'"):
                keyed(obs)
            keyed.close()
        finally:
            remote.close()


if __name__ == "__main__":
    _run_pipeline(Path(sys.argv[1]))
