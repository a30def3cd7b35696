"""VLAPolicy.predict overhead: end-to-end policy time ÷ bare backbone forward + head on the same inputs.

    python benchmarks/predict_latency.py [--repeats 30] [--pack-linear-weights]

Both are timed side by side in one run, alternating, on the OFT variant: a tiny configuration and a ~100M-parameter
one (Qwen2.5-VL text stack 768 wide × 12 layers). The policy path adds observation checks, image preprocessing,
prompt building, tokenisation, state normalisation and action decoding. Target ratio ≤ 1.10.

Two more columns, against the same bare time:
- `new state`: the policy with a different state at every call, as in a control loop. This OFT writes the state into
  its prompt, so every step builds and tokenises a new prompt (one observation repeated hits the prompt cache).
- `floor`: bare plus the image conversion alone (uint8 views → Qwen's normalised float patches, the backbone's input
  format). No host-side policy can go below it; in the tiny configuration it is already close to the target.

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
from hf_vla.backbones import get_backbone_adapter
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


def measure(policy: VLAPolicy, repeats: int) -> dict[str, float]:
    """Median seconds of: the policy on one fixed observation, the bare model on its inputs, the policy with a new
    state at every call (a control loop: the state text changes the prompt), and the pixel conversion alone. Every
    timed call follows a model forward, as it does inside `predict`."""
    image = example_image()
    obs = {
        "images": {"primary": image, "wrist": image[::-1].copy()},
        "instruction": "put the carrot on the plate",
        "state": np.zeros(7, np.float32),
    }
    views = [image, obs["images"]["wrist"]]
    inputs = policy.processor(images=[views], text=[obs["instruction"]], state=obs["state"][None])
    states = np.random.default_rng(0).uniform(-1, 1, size=(repeats + 3, 7)).astype(np.float32)
    adapter = get_backbone_adapter(policy.processor.backbone)
    pixel_buffer = inputs["pixel_values"].clone()

    def policy_call(step):
        policy.predict(obs)

    def bare_call(step):
        with torch.no_grad():
            policy.model.predict_action(**inputs)

    def control_loop_call(step):
        policy.predict({**obs, "state": states[step]})

    def pixels_call(step):
        adapter.preprocess_images(policy.processor.image_processor, views, out=pixel_buffer)

    order = (policy_call, bare_call, control_loop_call, bare_call, pixels_call, bare_call)
    timings = {fn: [] for fn in order}
    for step in range(repeats + 3):
        for fn in order:
            start = time.perf_counter()
            fn(step)
            if step >= 3:
                timings[fn].append(time.perf_counter() - start)
    return {fn.__name__: statistics.median(values) for fn, values in timings.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pack-linear-weights", action="store_true", help="hf_vla.packed_linear on both sides")
    args = parser.parse_args()
    packed = ", linear weights packed for oneDNN" if args.pack_linear_weights else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; two 224×224 views, state, horizon 16{packed}")
    print(f"{'config':>8} {'params':>8} {'policy ms':>9} {'bare ms':>8} {'ratio':>6} {'new state':>9} {'floor':>6}")
    for name, settings in CONFIGS.items():
        with tempfile.TemporaryDirectory() as root:
            policy = build_policy(root, pack=args.pack_linear_weights, **settings)
            params = sum(p.numel() for p in policy.model.parameters())
            ms = {key: value * 1e3 for key, value in measure(policy, args.repeats).items()}
        bare = ms["bare_call"]
        print(f"{name:>8} {params / 1e6:>7.1f}M {ms['policy_call']:>9.2f} {bare:>8.2f} {ms['policy_call'] / bare:>6.3f} "
              f"{ms['control_loop_call'] / bare:>9.3f} {(bare + ms['pixels_call']) / bare:>6.3f}")
    print("ratio: policy ÷ bare, one observation repeated; new state: a new state at every call; floor: (bare + image "
          "conversion alone) ÷ bare")

if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    main()
