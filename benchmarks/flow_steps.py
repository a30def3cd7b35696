"""Flow-matching step scaling: does `predict_action(num_steps=10)` cost what the FLOPs say it should?

    python benchmarks/flow_steps.py [--config small|default-heads] [--batch B] [--variants gr00t,pi,pi_v3]
                                    [--repeats N] [--threads N] [--pack-linear-weights]

(from the repository root, with the package importable, e.g. `PYTHONPATH=src`). Runs offline on CPU: `small` in
~1 minute, `default-heads` in ~5.

The flow-matching variants (`vla_gr00t`, `vla_pi`, `vla_pi_v3`) run the VLM once per call (the "prefix") and the DiT
head once per Euler step. Two configurations, both with two 224×224 views + instruction + state, horizon 16, batch 1
(`--batch B`: B copies of the observation per call, as a micro-batching policy server runs them):
- `small`: a random Qwen2.5-VL backbone 256 wide × 4 layers (MLP 1024) and heads scaled down to it (GR00T DiT 256 × 8,
  PI_v3 DiT 128); every step is a few hundred small ops.
- `default-heads`: a backbone 896 wide × 8 layers (Qwen2.5-0.5B's width, MLP 4864) with each framework's own default
  head (StarVLA's settings: GR00T DiT-B 768 × 16, PI at the VLM width, PI_v3 DiT 1024), as a released model has.
For each variant it measures:

1. FLOPs, counted with `torch.utils.flop_counter.FlopCounterMode`, of `predict_action(num_steps=k)` for k = 1 and 10,
   and the predicted time ratio  R_pred = F(k=10) / F(k=1).  They decompose into
   - the prefix: `model.conditions(...)` (VLM forward, vision tower included) plus the head's once-per-call work
     (`prepare_conditions` — PI_v3's per-layer projectors —, the cross-attention keys/values of the conditions
     (`project_contexts`), the attention mask and `encode_state`);
   - the schedule: everything that depends on the timesteps alone (`sampling_schedule(k)`: time features and AdaLN
     modulations of all k steps, computed in one batch), k × F_sched per step;
   - one head step: the `action_head.predict_velocity(...)` call each Euler step makes on those precomputed inputs;
   and "FLOP check" confirms F(k) = F_prefix + k·(F_sched + F_step) exactly.
   CPU SDPA dispatches to `aten._scaled_dot_product_flash_attention_for_cpu`, which the stock counter does not know;
   it is counted here with the same formula as the GPU SDPA kernels.
2. The measured ratio R_meas = median wall time of `predict_action(num_steps=10)` ÷ median of
   `predict_action(num_steps=1)`, timed side by side (alternating, after a warm-up, torch.no_grad, fixed noise).
   The deviation |R_meas − R_pred| / R_pred has a 10% target.

Since FLOPs do not capture per-op overheads (Python, aten dispatch and thread fork/join, paid per op whatever its size,
on a head that runs on ~50 tokens; the lower efficiency of its small matmuls), the same loop also times the prefix
alone and one head step alone, and reports the ratio predicted from those measured times,
R_time = (T_prefix + T_sched(10) + 10·T_step) / (T_prefix + T_sched(1) + T_step), plus the throughput (GFLOP/s) each part achieves, the step time
its FLOPs do not explain at the prefix's throughput ("excess"), how many aten ops one step dispatches (excess per op ≈
the fixed per-op CPU cost), and how much the prefix and one step speed up from 1 thread to the run's thread count
(overhead-bound work does not).

A third table asks whether the steps are bound by memory traffic rather than arithmetic: the bytes of the distinct
tensors the prefix and one step touch (weights, conditions' keys/values, activations), their FLOP per byte beside this
machine's ridge point (a 2048² matmul's rate ÷ the bandwidth of summing 256 MB), and the ratio a roofline predicts
(each part at max(FLOPs / matmul rate, bytes / bandwidth)).

`--pack-linear-weights` measures the models after `hf_vla.packed_linear.pack_linear_weights` (large float32 linear
layers on oneDNN with weights packed once, instead of MKL re-packing them per call, which costs most at a step's few
rows); its FLOPs are counted with the same formula as `aten.addmm`.

Timings on a shared machine are only meaningful when it is otherwise idle: another busy process on 2 cores can slow
multi-threaded ops several-fold (try `--threads 1` there).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import timeit

import numpy as np
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.defaults import example_image, synthetic_statistics
from hf_vla.heads.dit import attention_mask_from_key_padding
from hf_vla.packed_linear import onednn_available, pack_linear_weights
from hf_vla.testing import build_tiny_vlm

COMMON = dict(action_dim=7, action_horizon=16, state_dim=7, dropout=0.0)
CONFIGS = {
    "small": dict(
        vlm=dict(hidden_size=256, num_layers=4, intermediate_size=1024),
        heads={
            "gr00t": dict(dit_hidden_size=256, num_dit_layers=8, attention_head_dim=64, dit_output_dim=256,
                          head_hidden_size=256),
            "pi": dict(attention_head_dim=64, head_hidden_size=256),  # D = VLM width, one block per VLM layer
            "pi_v3": dict(dit_hidden_size=128, attention_head_dim=64, head_hidden_size=256),  # projected to D = 128
        },
    ),
    "default-heads": dict(
        vlm=dict(hidden_size=896, num_layers=8, intermediate_size=4864, num_heads=14),
        heads={"gr00t": {}, "pi": {}, "pi_v3": {}},  # each framework's default head
    ),
}  # fmt: skip
STEPS = (1, 10)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _packed_linear_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * out_shape[-1]


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
if onednn_available():
    CUSTOM_FLOPS[torch.ops.mkldnn._linear_pointwise] = _packed_linear_flop


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches (each pays a roughly fixed CPU overhead that FLOPs do not see)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


class StorageBytes(TorchDispatchMode):
    """Bytes of the distinct tensor storages a call's aten ops read or write (weights, conditions, activations), each
    counted once: the memory traffic of a call whose working set does not stay in cache between calls."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}
        # held until the count is read: a freed activation's address would otherwise be reused by a later tensor
        # and the two counted as one
        self._alive: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if not isinstance(value, torch.Tensor) or value.device.type == "meta":
                continue
            if value.is_mkldnn:  # a packed weight: opaque, no storage to look at
                self.storages[id(value)] = value.numel() * value.element_size()
                self._alive.append(value)
            else:
                storage = value.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
                self._alive.append(storage)
        return out


def count_bytes(fn) -> int:
    with StorageBytes() as counter:
        fn()
    return sum(counter.storages.values())


def machine_ridge_point(threads: int) -> tuple[float, float]:
    """This machine's float32 matmul throughput (GFLOP/s, a 2048² product) and read bandwidth (GB/s, summing 256 MB),
    at the run's thread count. Work with fewer FLOPs per byte moved than their ratio (the roofline's ridge point) is
    bound by memory, not arithmetic."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = torch.ones(64 * 2**20)
    matmul = min(timeit.repeat(lambda: a @ b, number=3, repeat=3)) / 3
    read = min(timeit.repeat(lambda: big.sum(), number=3, repeat=3)) / 3
    return 2 * 2048**3 / matmul / 1e9, big.numel() * 4 / read / 1e9


def build(vlm_dir: str, variant: str, head_settings: dict, batch: int = 1):
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, **COMMON, **head_settings).eval()
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[224, 224])
    processor.compute_norm_stats("bridge", *synthetic_statistics())
    image = example_image()
    inputs = processor(
        images=[[image, image[::-1].copy()]] * batch, text=["put the carrot on the plate"] * batch,
        state=np.zeros((batch, 7), np.float32),
    )
    return model, dict(inputs)


def measure(model, inputs: dict, repeats: int) -> dict:
    head = model.action_head
    batch = inputs["input_ids"].shape[0]
    noise = torch.randn(batch, COMMON["action_horizon"], COMMON["action_dim"], generator=torch.Generator().manual_seed(0))
    vlm_inputs = {k: v for k, v in inputs.items() if k != "state"}

    def prefix():  # everything predict_action does once per call, whatever the number of steps
        conditions, mask = model.conditions(**vlm_inputs)
        contexts = head.model.project_contexts(head.prepare_conditions(conditions))
        mask = None if mask is None else attention_mask_from_key_padding(mask, head.dtype)
        return contexts, mask, head.encode_state(model.head_state(inputs.get("state")), noise.shape[0])

    with torch.no_grad():
        conditions, mask, state_tokens = prefix()
        ((bucket, timestep_features),) = head.sampling_schedule(1)

        def step():  # what one Euler step of `sample` runs
            return head.predict_velocity(
                noise, bucket, conditions, mask, state_tokens, timestep_features, not head.tokens_interact
            )

        calls = {f"k={k}": (lambda k=k: model.predict_action(**inputs, noise=noise, num_steps=k)) for k in STEPS}
        calls.update(prefix=prefix, step=step)
        calls.update({f"sched{k}": (lambda k=k: head.sampling_schedule(k)) for k in STEPS})

        flops = {name: count_flops(calls[name]) for name in calls}
        ops = {"prefix": count_ops(prefix), "step": count_ops(step)}
        traffic = {"prefix": count_bytes(prefix), "step": count_bytes(step)}

        times = time_alternating(calls, repeats)
        # Thread scaling of the prefix and of one step alone: work bound by FLOPs speeds up with threads, work bound
        # by per-op overhead (dispatch, Python, thread sync on tiny tensors) does not.
        threads = torch.get_num_threads()
        single = {}
        if threads > 1:
            torch.set_num_threads(1)
            try:
                single = time_alternating({"prefix": prefix, "step": step}, max(5, repeats // 2))
            finally:
                torch.set_num_threads(threads)
    return {"flops": flops, "ops": ops, "bytes": traffic, "time": times, "time_1thread": single}


def time_alternating(calls: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each call, timed side by side: round-robin, the order reversed every other round."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    order = list(calls)
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls of each kind per variant "
                        "(default 30 for small, 10 for default-heads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=1, help="observations per predict_action call (default 1)")
    parser.add_argument("--variants", default="gr00t,pi,pi_v3", help="comma-separated subset (default: all three)")
    parser.add_argument("--pack-linear-weights", action="store_true", help="run large linear layers on oneDNN with "
                        "packed weights (hf_vla.packed_linear)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = CONFIGS[args.config]
    vlm, repeats = config["vlm"], args.repeats or (30 if args.config == "small" else 10)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"config {args.config}: VLM Qwen2.5-VL {vlm['hidden_size']}×{vlm['num_layers']} (MLP "
          f"{vlm['intermediate_size']}), two 224×224 views, batch {args.batch}, horizon {COMMON['action_horizon']}, "
          f"{repeats} repeats" + (", linear weights packed for oneDNN" if args.pack_linear_weights else ""))  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as root:
        vlm_dir = build_tiny_vlm(root, family="qwen2_5_vl", **vlm)
        variants = args.variants.split(",")
        unknown = sorted(set(variants) - set(config["heads"]))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; expected a subset of {list(config['heads'])}")
        for variant in variants:
            head_settings = config["heads"][variant]
            model, inputs = build(vlm_dir, variant, head_settings, args.batch)
            if args.pack_linear_weights:
                pack_linear_weights(model)
            result = measure(model, inputs, repeats)
            result.update(
                variant=variant,
                tokens=inputs["input_ids"].shape[1],
                params=sum(p.numel() for p in model.parameters()),
                head_params=sum(p.numel() for p in model.action_head.parameters()),
            )
            rows.append(result)
            del model

    k1, k10 = (f"k={k}" for k in STEPS)
    n = STEPS[1]
    print()
    print(f"{'variant':>8} {'params':>8} {'head':>7} {'tokens':>6} {'prefix GF':>9} {'step GF':>8} "
          f"{'R_pred':>7} {'R_meas':>7} {'dev':>6} {'R_time':>7} {'dev':>6}")  # fmt: skip
    for r in rows:
        f, t = r["flops"], r["time"]
        r_pred = f[k10] / f[k1]
        r_meas = t[k10] / t[k1]
        r_time = (t["prefix"] + t[f"sched{n}"] + n * t["step"]) / (t["prefix"] + t["sched1"] + t["step"])
        print(f"{r['variant']:>8} {r['params'] / 1e6:>7.1f}M {r['head_params'] / 1e6:>6.2f}M {r['tokens']:>6} "
              f"{f['prefix'] / 1e9:>9.3f} {f['step'] / 1e9:>8.3f} {r_pred:>7.3f} {r_meas:>7.3f} "
              f"{abs(r_meas - r_pred) / r_pred:>6.1%} {r_time:>7.3f} "
              f"{abs(r_meas - r_time) / r_time:>6.1%}")  # fmt: skip

    print()
    print(f"{'variant':>8} {'k=1 ms':>8} {'k=10 ms':>8} {'prefix ms':>9} {'step ms':>8} {'Δstep ms':>8} "
          f"{'prefix GF/s':>11} {'step GF/s':>9} {'excess ms':>9} {'ops/step':>8} {'µs/op':>6} "
          f"{'prefix ×thr':>11} {'step ×thr':>9} {'FLOP check':>10}")  # fmt: skip
    for r in rows:
        f, t = r["flops"], r["time"]
        marginal = (t[k10] - t[k1]) / (n - 1)  # per-step cost seen inside predict_action
        # step time beyond what its FLOPs would take at the prefix's throughput, and that excess per dispatched op
        excess = t["step"] - f["step"] * t["prefix"] / f["prefix"]
        speedup = lambda part: f"{r['time_1thread'][part] / t[part]:.2f}" if r["time_1thread"] else "-"  # noqa: E731
        exact = all(f[f"k={k}"] == f["prefix"] + k * (f["sched1"] + f["step"]) for k in STEPS)
        print(f"{r['variant']:>8} {t[k1] * 1e3:>8.2f} {t[k10] * 1e3:>8.2f} {t['prefix'] * 1e3:>9.2f} "
              f"{t['step'] * 1e3:>8.2f} {marginal * 1e3:>8.2f} {f['prefix'] / t['prefix'] / 1e9:>11.1f} "
              f"{f['step'] / t['step'] / 1e9:>9.1f} {excess * 1e3:>9.2f} {r['ops']['step']:>8} "
              f"{excess / r['ops']['step'] * 1e6:>6.1f} {speedup('prefix'):>11} {speedup('step'):>9} "
              f"{'exact' if exact else 'MISMATCH':>10}")  # fmt: skip
    print()
    peak, bandwidth = machine_ridge_point(torch.get_num_threads())
    print(f"Memory traffic (distinct storages read or written, MB) and arithmetic intensity (FLOP per byte); this "
          f"machine: {peak:.0f} GFLOP/s matmul, {bandwidth:.0f} GB/s read, ridge point {peak / bandwidth:.1f} FLOP/B")
    print(f"{'variant':>8} {'prefix MB':>9} {'step MB':>8} {'prefix F/B':>10} {'step F/B':>8} {'R_roof':>7} {'dev':>6}")
    for r in rows:
        f, b, t = r["flops"], r["bytes"], r["time"]
        roofline = {part: max(f[part] / (peak * 1e9), b[part] / (bandwidth * 1e9)) for part in ("prefix", "step")}
        r_roof = (roofline["prefix"] + n * roofline["step"]) / (roofline["prefix"] + roofline["step"])
        r_meas = t[k10] / t[k1]
        print(f"{r['variant']:>8} {b['prefix'] / 1e6:>9.1f} {b['step'] / 1e6:>8.1f} {f['prefix'] / b['prefix']:>10.1f} "
              f"{f['step'] / b['step']:>8.1f} {r_roof:>7.3f} {abs(r_meas - r_roof) / r_roof:>6.1%}")  # fmt: skip
    print()
    print("R_pred = F(k=10) / F(k=1) from FLOPs; R_meas = T(k=10) / T(k=1) measured; R_time = the same ratio from")
    print("the prefix, the schedule and one step timed alone (its dev is |R_meas − R_time| / R_time);")
    print("Δstep = (T(k=10) − T(k=1)) / 9; excess = T_step − F_step / (prefix GF/s), the step time FLOPs do not")
    print("explain, and µs/op = excess per aten op of one step; FLOP check: predict_action(k) counted directly equals")
    print("F_prefix + k·(F_sched + F_step); ×thr = time at 1 thread ÷ time at the run's thread count (prefix and")
    print("step alone). R_roof predicts the ratio from a roofline: each part takes max(FLOPs / matmul rate, bytes /")
    print("bandwidth); a part whose FLOP/B is below the ridge point is bound by memory traffic, which FLOPs cannot see.")


if __name__ == "__main__":
    main()
