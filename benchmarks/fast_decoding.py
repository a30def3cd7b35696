"""FAST decoding: tokens/s of constrained greedy decoding with the KV cache vs without, side by side in one run.

    python benchmarks/fast_decoding.py [--repeats 3]

An untrained FAST model on a small Qwen2.5-VL-shaped backbone (hidden 256, 4 layers), one 224×224 view; every
reply is forced to `--tokens` action tokens (end of turn is only allowed after that) so both paths do equal work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.action_tokenizers import FASTTokenizer
from hf_vla.defaults import example_image
from hf_vla.testing import build_tiny_vlm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    chunks = rng.uniform(-1, 1, (300, 16, 7)).cumsum(1) / 8
    fast = FASTTokenizer.fit(chunks, vocab_size=512)
    with tempfile.TemporaryDirectory() as root:
        vlm = build_tiny_vlm(root, hidden_size=256, num_layers=4, intermediate_size=1024)
        model = AutoModelForVLA.from_vlm(vlm, variant="fast", action_tokenizer=fast, action_dim=7, action_horizon=16,
                                         max_action_tokens=args.tokens)  # fmt: skip
        processor = VLAProcessor.from_vlm(vlm, model.config, image_size=[224, 224])
    processor.compute_norm_stats("sim", chunks.reshape(-1, 7))
    inputs = processor(images=[[example_image()]], text=["put the carrot on the plate"])
    model.generation_limits = lambda: (args.tokens, args.tokens)  # fixed-length replies for a fair comparison
    prompt = inputs["input_ids"].shape[1]

    timings = {True: [], False: []}
    for use_cache in (True, False):  # both paths warm
        model.generate_actions(**inputs, use_cache=use_cache)
    for round_index in range(args.repeats):
        for use_cache in (True, False) if round_index % 2 == 0 else (False, True):
            start = time.perf_counter()
            out = model.generate_actions(**inputs, use_cache=use_cache)
            timings[use_cache].append(time.perf_counter() - start)
            assert len(out.action_token_ids[0]) == args.tokens
    cached, uncached = statistics.median(timings[True]), statistics.median(timings[False])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {prompt} tokens, {args.tokens} new tokens")
    print(f"KV cache:    {args.tokens / cached:8.1f} tokens/s ({cached * 1e3:.0f} ms per reply)")
    print(f"no KV cache: {args.tokens / uncached:8.1f} tokens/s ({uncached * 1e3:.0f} ms per reply)")
    print(f"speed-up: {uncached / cached:.2f}x")


if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    __import__("logging").getLogger("hf_vla").setLevel("ERROR")  # untrained replies do not decode; expected here
    main()
