"""The whole loop in small: Meta-World expert demonstrations → LeRobot dataset → train_vla.py → closed-loop success.

Two tasks, a few minutes of CPU training, 10 unseen episodes each. Zero and random actions score 0 on these tasks, and
a model whose training or inference path is broken (wrong normalisation, images or instructions not reaching the
head, chunks executed out of order) cannot reach the threshold either. The same model is then rolled out through the
policy server and a websocket client, which must reproduce the in-process actions.
"""

import subprocess
import sys
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


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("closed_loop")
    generate_demonstrations(root / "demos", tasks=TASKS, episodes=DEMOS_PER_TASK, progress=False)
    output = root / "model"
    command = [sys.executable, str(ROOT / "trainers" / "train_vla.py"), str(ROOT / "trainers/recipes/metaworld.yaml"),
               "--data.lerobot", str(root / "demos"), "--trainer.output_dir", str(output),
               "--trainer.max_steps", str(TRAIN_STEPS), "--trainer.save_steps", "100000",
               "--trainer.logging_steps", "100", "--trainer.disable_tqdm", "true"]  # fmt: skip
    subprocess.run(command, check=True, timeout=1200)
    return output


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
