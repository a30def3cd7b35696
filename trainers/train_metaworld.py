#!/usr/bin/env python
"""The closed-loop proof on Meta-World, end to end: expert demonstrations → LeRobot dataset → train → evaluate.

    python trainers/train_metaworld.py [--episodes 50] [--max-steps 3600] [--eval-episodes 20] [--install]

1. `hf_vla.sim.metaworld.generate_demonstrations`: the scripted experts on the four easy tasks plus the faucet pair
   (same scene, opposite instructions), successful episodes only, written as a LeRobot v3.0 dataset.
2. `trainers/train_vla.py trainers/recipes/metaworld.yaml`: one tiny language-conditioned OFT policy on all six tasks.
3. `hf_vla.sim.evaluation.evaluate` on unseen seeds: every task as is; every task with the camera image blanked;
   the faucet pair with the instructions swapped. Results go to <output>/metaworld_eval/ (JSON, plots, videos) and
   the standard rows into <output>/eval_results.json, the table of the generated model card.

`--install` copies the model into src/hf_vla/assets/default_model: the embedded default of `make demo` and the Space.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hf_vla.cli import load_policy
from hf_vla.sim.evaluation import EvalConfig, InProcessPolicy, add_to_model_card_results, evaluate, write_report
from hf_vla.sim.evaluation import swapped_instructions
from hf_vla.sim.metaworld import EASY_TASKS, generate_demonstrations

ROOT = Path(__file__).resolve().parents[1]
DEMONSTRATIONS_REQUEST = "hf_vla_demonstrations.json"  # the tasks and episode count a --data folder was made for
PAIR = ("faucet-open", "faucet-close")
SHIPPED = ["config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja", "training_recipe.yaml", "eval_results.json", "train_results.json"]  # fmt: skip


def ensure_demonstrations(data: Path, tasks, episodes: int, generate=generate_demonstrations) -> dict | None:
    """Generates the demonstrations into `data` (returns the summary), or reuses the folder when an earlier run
    generated this same request there (returns None). A folder made for other tasks or episode counts is refused:
    training on it would silently ignore --tasks and --episodes."""
    request = {"tasks": sorted(tasks), "episodes": episodes}
    record = data / DEMONSTRATIONS_REQUEST
    if (data / "meta" / "info.json").exists():
        found = json.loads(record.read_text()) if record.exists() else "a request it does not record"
        if found != request:
            raise SystemExit(f"--data {data}: holds demonstrations for {found}, not {request}; pass another --data "
                             "folder or remove this one")
        return None
    summary = generate(data, tasks=tasks, episodes=episodes)
    record.write_text(json.dumps(request))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "outputs" / "metaworld"))
    parser.add_argument("--data", default=str(ROOT / "data" / "metaworld"))
    parser.add_argument("--tasks", nargs="+", default=[*EASY_TASKS, *PAIR])
    parser.add_argument("--episodes", type=int, default=50, help="demonstrations per task")
    parser.add_argument("--max-steps", type=int, default=3600, help="optimiser steps")
    parser.add_argument("--eval-episodes", type=int, default=20, help="closed-loop episodes per task and condition")
    parser.add_argument("--skip-training", action="store_true", help="evaluate an existing --output model")
    parser.add_argument("--install", action="store_true", help="copy the model into src/hf_vla/assets/default_model")
    args, overrides = parser.parse_known_args(argv)  # the rest goes to train_vla.py, e.g. --trainer.seed 1
    if args.skip_training and overrides:
        parser.error(f"--skip-training: train_vla.py overrides {overrides} would be ignored; drop them")
    output, data = Path(args.output).expanduser(), Path(args.data).expanduser()
    timings = {}

    if not args.skip_training:  # evaluating an existing model needs no demonstrations
        start = time.perf_counter()
        summary = ensure_demonstrations(data, args.tasks, args.episodes)
        if summary is not None:
            timings["demonstrations_s"] = round(time.perf_counter() - start, 1)
            print(json.dumps(summary, indent=2))

        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "trainers" / "train_vla.py"), str(ROOT / "trainers/recipes/metaworld.yaml"),
                        "--data.lerobot", str(data), "--trainer.output_dir", str(output),
                        "--trainer.max_steps", str(args.max_steps), *overrides], check=True)  # fmt: skip
        timings["training_s"] = round(time.perf_counter() - start, 1)

    policy = InProcessPolicy(load_policy(str(output), "--output"))
    results_dir = output / "metaworld_eval"
    conditions = {
        "standard": EvalConfig(tasks=args.tasks, episodes=args.eval_episodes, video_dir=str(results_dir / "videos")),
        "image blanked": EvalConfig(tasks=args.tasks, episodes=args.eval_episodes, blank_image=True),
        "instructions swapped": EvalConfig(tasks=PAIR, episodes=args.eval_episodes,
                                           instructions=swapped_instructions(PAIR)),  # fmt: skip
    }
    reports = {}
    for name, config in conditions.items():
        if name == "instructions swapped" and not set(PAIR) <= set(args.tasks):
            continue
        report = reports[name] = evaluate(policy, config)
        report["condition"] = name
        write_report(report, results_dir / name.replace(" ", "_"), label=f"Meta-World, {name}")
        print(f"\n{name}:")
        for task, row in report["tasks"].items():
            print(f"  {task:22s} {row['successes']:2d}/{row['episodes']}  CI95 {row['ci95']}  ({row['instruction']!r})")
    easy = [reports["standard"]["tasks"][t] for t in EASY_TASKS if t in reports["standard"]["tasks"]]
    summary = {
        "timings": timings,
        "easy_tasks_success_rate": sum(r["successes"] for r in easy) / max(1, sum(r["episodes"] for r in easy)),
        "env_steps_per_second": reports["standard"]["env_steps_per_second"],
        "conditions": {name: {t: r["success_rate"] for t, r in rep["tasks"].items()} for name, rep in reports.items()},
    }
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))

    (output / "eval_results.json").unlink(missing_ok=True)
    add_to_model_card_results(reports["standard"], output)
    add_to_model_card_results(reports["image blanked"], output, suffix=" (image blanked)")
    if "instructions swapped" in reports:
        add_to_model_card_results(reports["instructions swapped"], output, suffix=" (instructions swapped)")

    if args.install:
        target = ROOT / "src" / "hf_vla" / "assets" / "default_model"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            if (output / name).exists():
                shutil.copy2(output / name, target / name)
        shutil.copy2(results_dir / "summary.json", target / "metaworld_summary.json")
        print(f"installed into {target}")


if __name__ == "__main__":
    main()
