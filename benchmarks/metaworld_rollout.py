"""Meta-World rollout speed: environment steps per second with the policy in process vs behind the policy server.

    python benchmarks/metaworld_rollout.py [--model DIR] [--tasks drawer-open door-open] [--episodes 5]

The same model (the embedded default unless --model) runs the same episodes (same seeds, 4 actions executed per
chunk) twice, alternating task by task: once through `VLAPolicy.predict` in this process, once through `hf-vla serve`
in a separate process on 127.0.0.1 and our websocket client. Prints env steps/s, success and the served/in-process
time ratio; rendering (EGL/llvmpipe) and physics are part of both.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

from hf_vla.defaults import default_model_dir
from hf_vla.sim.evaluation import EvalConfig, InProcessPolicy, ServerPolicy, evaluate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the policy server did not come up")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tasks", nargs="+", default=["drawer-open", "door-open"])
    parser.add_argument("--episodes", type=int, default=5)
    args = parser.parse_args()
    model = args.model or default_model_dir()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "hf_vla.cli", "serve", model, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_healthy(port)
        local, remote = InProcessPolicy(model), ServerPolicy(f"ws://127.0.0.1:{port}")
        totals = {"in-process": [0, 0.0, 0], "server": [0, 0.0, 0]}  # env steps, seconds, successes
        sides = [("in-process", local), ("server", remote)]
        for _, policy in sides:  # one-time costs (imports, MuJoCo and renderer set-up, first requests) untimed
            evaluate(policy, EvalConfig(tasks=args.tasks[:1], episodes=1, max_steps=8), progress=False)
        for i, task in enumerate(args.tasks):
            for name, policy in sides if i % 2 == 0 else sides[::-1]:  # neither side always goes first
                start = time.perf_counter()
                report = evaluate(policy, EvalConfig(tasks=[task], episodes=args.episodes), progress=False)
                totals[name][1] += time.perf_counter() - start
                totals[name][0] += report["env_steps"]
                totals[name][2] += report["average"]["successes"]
        remote.close()
    finally:
        server.terminate()
        server.wait(30)
    episodes = args.episodes * len(args.tasks)
    print(f"model: {model}; tasks {args.tasks}, {args.episodes} episodes each, 4 actions per chunk")
    for name, (steps, seconds, successes) in totals.items():
        print(f"{name:10s}: {steps / seconds:6.1f} env steps/s ({1000 * seconds / steps:.1f} ms per step), "
              f"success {successes}/{episodes}")
    per_step = {name: seconds / steps for name, (steps, seconds, _) in totals.items()}
    print(f"server / in-process time per env step: {per_step['server'] / per_step['in-process']:.3f}")


if __name__ == "__main__":
    main()
