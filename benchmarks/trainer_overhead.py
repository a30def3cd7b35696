"""VLATrainer overhead: Trainer step time ÷ a minimal hand-written torch training loop.

    python benchmarks/trainer_overhead.py [--steps 20] [--rounds 6] [--threads 1]

Same model (two copies of one initialisation), same pre-collated batches, same optimizer (the class and settings
Trainer picks from TrainingArguments, AdamW by default, with VLATrainer's parameter groups), same gradient clipping
and linear schedule. The hand loop is forward → backward → clip → step → schedule → zero_grad over a list of batches;
Trainer gets the same batches through a pass-through collator (batch size 1 of pre-collated batches), logs every
`--logging-steps` and saves nothing. The step time is the median interval between consecutive step ends (the first
interval of a run left out); runs alternate, and the reported ratio is the median over rounds of the ratio within a
round, which is robust to load from other processes on a shared machine. Target ratio ≤ 1.05.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments, get_scheduler

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.data.collators import METADATA_KEYS, VLACollator
from hf_vla.testing import build_tiny_vlm
from hf_vla.training import VLATrainer, build_param_groups

CONFIGS = {
    "tiny": dict(hidden_size=64, num_layers=2),
    "small": dict(hidden_size=256, num_layers=4),
}


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def make_batches(processor, count: int, batch_size: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    collate = VLACollator(processor)
    batches = []
    for _ in range(count):
        samples = [{
            "images": {camera: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for camera in processor.camera_names},
            "instruction": "put the carrot on the plate",
            "state": rng.normal(size=7).astype(np.float32),
            "actions": rng.normal(size=(8, 7)).astype(np.float32),
            "action_mask": np.ones(8, dtype=bool),
        } for _ in range(batch_size)]  # fmt: skip
        batches.append(collate(samples))
    return batches


def hand_loop(model, args, batches) -> list[float]:
    """The reference: the few lines a user would write without Trainer."""
    decay_names = VLATrainer.get_decay_parameter_names(None, model)  # uses neither self nor the trainer's state
    groups = build_param_groups(model, args.learning_rate, args.weight_decay, decay_names, {"action_head": 1e-3})
    optimizer_cls, optimizer_kwargs = VLATrainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    inputs = [{k: v for k, v in batch.items() if k not in METADATA_KEYS} for batch in batches]
    model.train()
    ends = []
    for batch in inputs:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return np.diff(ends).tolist()


def trainer_loop(model, args, batches, processor) -> list[float]:
    clock = StepClock()
    trainer = VLATrainer(
        model, args, data_collator=lambda features: features[0], train_dataset=batches, processing_class=processor,
        learning_rates={"action_head": 1e-3}, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    return np.diff(clock.ends).tolist()


def measure(name: str, steps: int, rounds: int, batch_size: int, logging_steps: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        vlm = build_tiny_vlm(f"{root}/vlm", family="qwen2_5_vl", **CONFIGS[name])
        torch.manual_seed(0)
        model = AutoModelForVLA.from_vlm(vlm, variant="oft", action_dim=7, action_horizon=8, state_dim=7)
        processor = VLAProcessor.from_vlm(vlm, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
        processor.compute_norm_stats("bench", np.random.default_rng(0).normal(size=(256, 7)),
                                     np.random.default_rng(1).normal(size=(256, 7)))  # fmt: skip
        batches = make_batches(processor, steps, batch_size)
        args = TrainingArguments(
            f"{root}/out", per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
            logging_steps=logging_steps, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
            lr_scheduler_type="linear", dataloader_num_workers=0,
        )  # fmt: skip
        hand_model, trainer_model = model, copy.deepcopy(model)
        hand, trainer = [], []
        for round_index in range(rounds):
            # alternate which loop goes first, so neither always runs right after the other's warm caches
            runs = [("hand", hand_loop, (hand_model, args, batches)),
                    ("trainer", trainer_loop, (trainer_model, args, batches, processor))]  # fmt: skip
            for label, loop, loop_args in runs if round_index % 2 == 0 else runs[::-1]:
                (hand if label == "hand" else trainer).append(statistics.median(loop(*loop_args)[1:]))
        # rounds run back to back, so the ratio within a round is the least sensitive to load from other processes
        ratio = statistics.median(t / h for t, h in zip(trainer, hand))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:>6} ({params:.1f}M params, batch {batch_size}): hand loop {statistics.median(hand) * 1e3:7.1f} "
              f"ms/step   VLATrainer {statistics.median(trainer) * 1e3:7.1f} ms/step   ratio {ratio:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.configs:
        measure(name, args.steps, args.rounds, args.batch_size, args.logging_steps)


if __name__ == "__main__":
    main()
