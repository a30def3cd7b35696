"""Policy server cost: websocket round trip vs in-process `VLAPolicy.predict`, and throughput with 8 clients.

    python benchmarks/serve_roundtrip.py [--repeats 30] [--seconds 8] [--hidden-size 64 --layers 2] [--threads N]

One tiny OFT model (two 224×224 views, state, horizon 16) is saved to a temporary directory, served by
`hf_vla.serving` in a separate process on 127.0.0.1 and loaded in-process from the same files. Latency: the same
observation alternately through `policy.predict` and through the server (our client, and openpi-client when it is
installed); target: round trip ≤ 1.10 × in-process + 2 ms. Throughput: 8 client threads send distinct observations
back to back for a fixed time, against a server with micro-batching and one without.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import torch

from hf_vla import AutoModelForVLA, VLAPolicy, VLAProcessor
from hf_vla.defaults import example_image, synthetic_statistics
from hf_vla.serving import PolicyClient
from hf_vla.testing import build_tiny_vlm

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def save_model(root: str, hidden_size: int, layers: int) -> str:
    vlm = build_tiny_vlm(os.path.join(root, "vlm"), family="qwen2_5_vl", hidden_size=hidden_size, num_layers=layers)
    model = AutoModelForVLA.from_vlm(vlm, variant="oft", action_dim=7, action_horizon=16, state_dim=7)
    processor = VLAProcessor.from_vlm(vlm, model.config, camera_names=["primary", "wrist"], image_size=[224, 224])
    actions, states = synthetic_statistics()
    processor.compute_norm_stats("bridge", actions, states)
    out = os.path.join(root, "model")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def observation(seed: int) -> dict:
    image = example_image()
    rng = np.random.default_rng(seed)
    wrist = np.roll(image[::-1], int(rng.integers(0, 224)), axis=1).copy()
    return {"images": {"primary": image, "wrist": wrist}, "instruction": "put the carrot on the plate",
            "state": rng.uniform(-0.5, 0.5, 7).astype(np.float32)}


class ServerProcess:
    """`hf_vla.serving.server.main` in a child process, ready once /healthz answers."""

    def __init__(self, model_dir: str, *flags: str, threads: int | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        argv = ["--model", model_dir, "--port", str(self.port), *flags]
        code = f"import sys; from hf_vla.serving.server import main; sys.exit(main({argv!r}))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("the server process exited") from None
                time.sleep(0.2)
        self.close()
        raise TimeoutError("the server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def latency(policy: VLAPolicy, port: int, repeats: int) -> None:
    obs = observation(0)
    wire = {"observation/primary": obs["images"]["primary"], "observation/wrist": obs["images"]["wrist"],
            "observation/state": obs["state"], "prompt": obs["instruction"]}
    client = PolicyClient("127.0.0.1", port)

    def in_process():
        policy.predict(obs)
        return {"server_timing": {}}

    calls = {"in-process predict": in_process, "round trip, hf_vla client": lambda: client.infer(wire)}
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        openpi = WebsocketClientPolicy("127.0.0.1", port)
        calls["round trip, openpi-client"] = lambda: openpi.infer(wire)
    except ImportError:
        print("(openpi-client not installed: pip install --no-deps openpi-client==0.1.2)")
    np.testing.assert_allclose(client.infer(wire)["actions"], policy.predict(obs), atol=1e-4)

    for _ in range(3):
        for fn in calls.values():
            fn()
    # Short blocks rather than strict alternation: after a predict, torch's OpenMP workers spin for a while, and on
    # a 2-core machine that steals the CPU from whichever process runs next, which would bill every round trip.
    timings, serving = {name: [] for name in calls}, {name: [] for name in calls}
    block = 5
    for _ in range(0, repeats, block):
        for name, fn in calls.items():
            for _ in range(block):
                start = time.perf_counter()
                reply = fn()
                elapsed = (time.perf_counter() - start) * 1e3
                timings[name].append(elapsed)
                if "infer_ms" in reply["server_timing"]:
                    serving[name].append(elapsed - reply["server_timing"]["infer_ms"])
    client.close()

    base = statistics.median(timings["in-process predict"])
    target = 0.1 * base + 2
    print(f"\nlatency, median of {len(timings['in-process predict'])} (two 224×224 views + state, horizon 16), "
          f"one client; target overhead ≤ 10% + 2 ms = {target:.2f} ms")
    for name, values in timings.items():
        median = statistics.median(values)
        line = f"  {name:<28} {median:8.2f} ms"
        if serving[name]:
            line += (f"  vs in-process {median - base:+6.2f} ms ({median / base - 1:+.1%}, "
                     f"{'met' if median - base <= target else 'MISSED'}); "
                     f"round trip − server-side predict {statistics.median(serving[name]):.2f} ms")
        print(line)


def throughput(port: int, clients: int, seconds: float) -> tuple[float, float]:
    """Requests/s and mean samples per predict call, with `clients` threads sending back to back."""
    stop, counts, errors, batch_sizes = threading.Event(), [0] * clients, [], []
    warm = threading.Barrier(clients + 1, timeout=120)

    def work(i):
        try:
            with PolicyClient("127.0.0.1", port) as client:
                obs = observation(i + 1)
                wire = {**obs["images"], "prompt": obs["instruction"], "state": obs["state"]}
                client.infer(wire)  # warm-up, not counted
                warm.wait()
                while not stop.is_set():
                    batch_sizes.append(client.infer(wire)["server_timing"]["batch_size"])
                    counts[i] += 1
        except Exception as error:
            errors.append(error)
            warm.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        warm.wait()
    except threading.BrokenBarrierError:
        pass
    start_counts, start = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - start_counts, time.perf_counter() - start
    stop.set()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return done / elapsed, float(np.mean(batch_sizes or [0]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads in both processes (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; loopback; "
          f"tiny OFT (hidden {args.hidden_size}, {args.layers} layers)")
    with tempfile.TemporaryDirectory() as root:
        model_dir = save_model(root, args.hidden_size, args.layers)
        policy = VLAPolicy.from_pretrained(model_dir)
        with ServerProcess(model_dir, threads=args.threads) as server:
            latency(policy, server.port, args.repeats)
            batched = throughput(server.port, args.clients, args.seconds)
        with ServerProcess(model_dir, "--no-batching", threads=args.threads) as server:
            unbatched = throughput(server.port, args.clients, args.seconds)
    print(f"\nthroughput, {args.clients} concurrent clients, {args.seconds:.0f} s each:")
    print(f"  micro-batched  {batched[0]:7.1f} req/s  (mean {batched[1]:.1f} samples per predict call)")
    print(f"  unbatched      {unbatched[0]:7.1f} req/s")
    if unbatched[0]:
        print(f"  speed-up       {batched[0] / unbatched[0]:7.2f}×")


if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    main()
