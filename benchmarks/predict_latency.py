"""VLAPolicy.predict overhead: end-to-end policy time ÷ bare backbone forward + head on the same inputs.

    python benchmarks/predict_latency.py [--repeats 30] [--pack-linear-weights]

Both are timed side by side in one run, alternating, on the OFT variant: a tiny configuration and a ~100M-parameter
one (Qwen2.5-VL text stack 768 wide × 12 layers). The policy path adds observation checks, image resize and
preprocessing, prompt building, tokenisation, state normalisation and action decoding. Target ratio ≤ 1.10.
`--pack-linear-weights` builds the policies with `VLAPolicy(..., pack_linear_weights=True)` (both columns then run
the packed model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from hf_vla import AutoModelForVLA, VLAPolicy, VLAProcessor
from hf_vla.defaults import example_image, synthetic_statistics
from hf_vla.testing import build_tiny_vlm

CONFIGS = {
    "tiny": dict(hidden_size=64, num_layers=2),
    "~100M": dict(hidden_size=768, num_layers=12, intermediate_size=3072),
}


def build_policy(root: str, hidden_size: int, num_layers: int, pack: bool = False, **overrides) -> VLAPolicy:
    vlm = build_tiny_vlm(root, family="qwen2_5_vl", hidden_size=hidden_size, num_layers=num_layers, **overrides)
    model = AutoModelForVLA.from_vlm(vlm, variant="oft", action_dim=7, action_horizon=16, state_dim=7)
    processor = VLAProcessor.from_vlm(vlm, model.config, camera_names=["primary", "wrist"], image_size=[224, 224])
    actions, states = synthetic_statistics()
    processor.compute_norm_stats("bridge", actions, states)
    return VLAPolicy(model, processor, pack_linear_weights=pack)


def measure(policy: VLAPolicy, repeats: int) -> tuple[float, float]:
    image = example_image()
    obs = {
        "images": {"primary": image, "wrist": image[::-1].copy()},
        "instruction": "put the carrot on the plate",
        "state": np.zeros(7, np.float32),
    }
    inputs = policy.processor(images=[[image, obs["images"]["wrist"]]], text=[obs["instruction"]], state=obs["state"][None])

    def policy_call():
        policy.predict(obs)

    def bare_call():
        with torch.no_grad():
            policy.model.predict_action(**inputs)

    for _ in range(3):
        policy_call(), bare_call()
    timings = {policy_call: [], bare_call: []}
    for _ in range(repeats):
        for fn in (policy_call, bare_call):
            start = time.perf_counter()
            fn()
            timings[fn].append(time.perf_counter() - start)
    return statistics.median(timings[policy_call]), statistics.median(timings[bare_call])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pack-linear-weights", action="store_true", help="hf_vla.packed_linear on both sides")
    args = parser.parse_args()
    packed = ", linear weights packed for oneDNN" if args.pack_linear_weights else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; two 224×224 views, state, horizon 16{packed}")
    print(f"{'config':>8} {'params':>10} {'policy ms':>10} {'bare ms':>9} {'ratio':>6}")
    for name, settings in CONFIGS.items():
        with tempfile.TemporaryDirectory() as root:
            policy = build_policy(root, pack=args.pack_linear_weights, **settings)
            params = sum(p.numel() for p in policy.model.parameters())
            policy_s, bare_s = measure(policy, args.repeats)
        print(f"{name:>8} {params / 1e6:>9.1f}M {policy_s * 1e3:>10.2f} {bare_s * 1e3:>9.2f} {policy_s / bare_s:>6.3f}")


if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    main()
