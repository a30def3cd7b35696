"""predict_action of every variant at StarVLA's Qwen3-VL-4B configuration (random weights), per attention backend and
with torch.compile: the GPU figures issue 3 asks for, appended to benchmarks/RESULTS.md.

    python benchmarks/gpu_variants.py [--out benchmarks/RESULTS.md] [--variants oft,gr00t,pi,pi_v3,fast,bins]
        [--modes sdpa,flash_attention_2,compile] [--repeats 10] [--device cuda] [--dtype bfloat16]
    python benchmarks/gpu_variants.py --config tiny --device cpu --dtype float32 --out /tmp/r.md   # same path, CPU

(from the repository root with `PYTHONPATH=src`). Each variant is built straight on the device from
`published_vlm_config("qwen3_vl_4b")` and the variant's default head (StarVLA's settings) — random initialisation, no
download — with the special-token ids of an offline tokenizer, which builds the prompts (two 224×224 views,
an instruction, a 7-D state; batch 1, horizon 16). Token variants get their action tokens the way `from_vlm` adds them.

Modes: `sdpa`; `flash_attention_2` when the `flash_attn` package imports (reported as unavailable otherwise);
`compile`: sdpa with the backbone and the head's network each `torch.compile`d (the first call, compilation included,
is reported apart). Times are medians of `--repeats` synchronised calls after two warm-up calls, at the default number
of steps. For the flow variants (sdpa) the table also gives the 10-step ÷ 1-step time ratio beside the ratio the FLOP
counts predict (the CPU target of issue 3, which the CPU misses where steps are too small to run at full efficiency).

On a lent GPU with a 15-minute budget: one call with `--modes sdpa,flash_attention_2` for every variant (each model is
initialised on the GPU in seconds; PI at this size has 7.8B parameters), then `--modes compile` for a few variants
(compilation takes minutes each). Write to `--out $OUT/RESULTS.md` there and copy the table into benchmarks/RESULTS.md.
Checked on CPU: `--config tiny` runs every variant and mode; at `qwen3-vl-4b` every variant builds (meta device).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from fast_tokenizer import smooth_chunks  # benchmarks/ is on sys.path when a script here runs
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText, AutoTokenizer

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.action_tokenizers import FASTTokenizer
from hf_vla.auto import VARIANTS
from hf_vla.defaults import example_image, synthetic_statistics
from hf_vla.testing import build_tiny_vlm, published_vlm_config, tiny_vlm_config

COMMON = dict(action_dim=7, action_horizon=16, state_dim=7)
FLOW_VARIANTS = ("gr00t", "pi", "pi_v3")
SPECIAL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip


def backbone_config(name: str, tokenizer):
    """The backbone config, with the special-token ids of `tokenizer` (random weights: only the ids must agree)."""
    if name == "tiny":
        return tiny_vlm_config("qwen3_vl", tokenizer, hidden_size=64, num_layers=2, vision_hidden_size=32)
    config = published_vlm_config("qwen3_vl_4b")
    for field, token in SPECIAL_TOKENS.items():
        setattr(config, field, tokenizer.convert_tokens_to_ids(token))
    return config


def build_model(variant: str, vlm_config, tokenizer_dir: str, device: str, dtype, attn: str):
    """`from_vlm`'s steps without weights to load: the variant's tokenizer-derived settings and vocabulary changes
    are worked out on a meta-device backbone, then the whole model is initialised on `device`."""
    model_class = VARIANTS[f"vla_{variant}"][1]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = model_class.config_kwargs_from_tokenizer(tokenizer, dict(COMMON))
    with torch.device("meta"):
        backbone = AutoModelForImageTextToText.from_config(vlm_config)
    model_class.adapt_backbone(backbone, tokenizer, kwargs)
    config = model_class.config_class(vlm_config=backbone.config, **kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForVLA.from_config(config, dtype=dtype, attn_implementation=attn)
    if variant == "fast":
        model.set_action_tokenizer(fitted_fast_tokenizer())
    return model.eval()


def fitted_fast_tokenizer() -> FASTTokenizer:
    """A FAST tokenizer fitted on smooth random chunks (the model's weights are random too: only the shapes and the
    decoding work matter here)."""
    chunks = smooth_chunks(np.random.default_rng(0), 2000, COMMON["action_horizon"], COMMON["action_dim"])
    return FASTTokenizer.fit(chunks, scale=10, vocab_size=1024)


def model_inputs(model, tokenizer_dir: str, device: str, dtype) -> dict:
    processor = VLAProcessor.from_vlm(tokenizer_dir, model.config, camera_names=["primary", "wrist"],
                                      image_size=[224, 224])  # fmt: skip
    processor.compute_norm_stats("bridge", *synthetic_statistics())
    image = example_image()
    encoded = processor(images=[[image, image[::-1].copy()]], text=["put the carrot on the plate"],
                        state=np.zeros((1, 7), np.float32))  # fmt: skip
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in encoded.items()}


def compile_networks(model) -> None:
    model.vlm.model.compile()
    head = getattr(model, "action_head", None)
    if head is not None:
        (head.model if hasattr(head, "model") else head).compile()


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(first call s, median of `repeats` calls after two warm-ups, s), synchronised."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def flop_ratio(model, inputs: dict) -> float:
    from flow_steps import CUSTOM_FLOPS  # CPU attention (and oneDNN linears), which the stock counter misses

    flops = []
    for steps in (1, 10):
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            model.predict_action(**inputs, num_steps=steps)
        flops.append(counter.get_total_flops())
    return flops[1] / flops[0]


def measure(variant: str, mode: str, args, vlm_config, tokenizer_dir: str) -> dict:
    attn = "flash_attention_2" if mode == "flash_attention_2" else "sdpa"
    model = build_model(variant, vlm_config, tokenizer_dir, args.device, args.dtype, attn)
    inputs = model_inputs(model, tokenizer_dir, args.device, args.dtype)
    row = {"variant": variant, "mode": mode, "params": sum(p.numel() for p in model.parameters())}
    if mode == "compile":
        compile_networks(model)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        row["first_s"], row["median_s"] = timed(lambda: model.predict_action(**inputs), args.device, args.repeats)
        if variant in FLOW_VARIANTS and mode == "sdpa":
            _, one = timed(lambda: model.predict_action(**inputs, num_steps=1), args.device, args.repeats)
            _, ten = timed(lambda: model.predict_action(**inputs, num_steps=10), args.device, args.repeats)
            row.update(r_meas=ten / one, r_pred=flop_ratio(model, inputs))
    if args.device.startswith("cuda"):
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], args) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.device})"
    lines = [
        f"## predict_action per variant — {args.config}, {str(args.dtype).removeprefix('torch.')}, {device}",
        "",
        f"{datetime.date.today()}; torch {torch.__version__}, transformers {transformers.__version__}; batch 1, two "
        f"224×224 views, horizon 16, median of {args.repeats}. Command: `{' '.join(['python'] + sys.argv)}`",
        "",
        "| variant | mode | params | predict_action ms | first call s | peak GiB | 10-step ÷ 1-step (FLOP prediction) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['mode']} | | {r['error']} | | | |")
            continue
        ratio = ""
        if "r_meas" in r:
            ratio = f"{r['r_meas']:.3f} ({r['r_pred']:.3f}, {abs(r['r_meas'] / r['r_pred'] - 1):.1%} off)"
        peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
        lines.append(f"| {r['variant']} | {r['mode']} | {r['params'] / 1e9:.2f}B | {r['median_s'] * 1e3:.1f} | "
                     f"{r['first_s']:.1f} | {peak} | {ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["qwen3-vl-4b", "tiny"], default="qwen3-vl-4b")
    parser.add_argument("--variants", default="oft,gr00t,pi,pi_v3,fast,bins")
    parser.add_argument("--modes", default="sdpa,flash_attention_2,compile")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="benchmarks/RESULTS.md", help="markdown file the table is appended to")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    flash_available = importlib.util.find_spec("flash_attn") is not None

    rows = []
    with tempfile.TemporaryDirectory() as root:
        tokenizer_dir = build_tiny_vlm(root, family="qwen3_vl")  # its tokenizer and image processor build the prompts
        vlm_config = backbone_config(args.config, AutoTokenizer.from_pretrained(tokenizer_dir))
        for variant in args.variants.split(","):
            for mode in args.modes.split(","):
                if mode == "flash_attention_2" and not flash_available:
                    rows.append({"variant": variant, "mode": mode, "error": "flash_attn not installed"})
                    continue
                try:
                    rows.append(measure(variant, mode, args, vlm_config, tokenizer_dir))
                except Exception as error:  # one failing mode must not lose the other figures
                    rows.append({"variant": variant, "mode": mode, "error": f"{type(error).__name__}: {error}"[:200]})
                print(rows[-1], flush=True)
    table = markdown(rows, args)
    with Path(args.out).open("a") as out:
        out.write("\n" + table)
    print(table)


if __name__ == "__main__":
    main()
