#!/usr/bin/env python
"""Reproduce the embedded default model: synthetic reaching demonstrations → train_vla.py → closed-loop evaluation.

    python trainers/train_default_model.py [--episodes 300] [--max-steps 1500] [--install]

`--install` copies the trained model (weights, config, processor, recipe, evaluation) into
src/hf_vla/assets/default_model, which `hf_vla.defaults.default_model_dir()` serves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hf_vla import VLAPolicy
from hf_vla.data.synthetic import evaluate, write_reach_dataset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja", "training_recipe.yaml", "eval_results.json"]  # fmt: skip


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--max-steps", type=int, default=2500)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "default-reach"))
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--install", action="store_true")
    args = parser.parse_args()

    output = Path(args.output)
    data = output.parent / "reach-demos"
    if not (data / "meta" / "info.json").exists():
        write_reach_dataset(data, episodes=args.episodes, image_size=96)
    start = time.time()
    subprocess.run([sys.executable, str(ROOT / "trainers" / "train_vla.py"), str(ROOT / "trainers/recipes/default_reach.yaml"),
                    "--data.lerobot", str(data), "--trainer.output_dir", str(output),
                    "--trainer.max_steps", str(args.max_steps)], check=True)  # fmt: skip
    minutes = (time.time() - start) / 60

    policy = VLAPolicy.from_pretrained(str(output))

    def act(obs, blank=False):
        obs = {k: v for k, v in obs.items() if k != "state" or policy.processor.state_dim}
        if blank:
            obs["images"] = {"primary": np.zeros_like(obs["images"]["primary"])}
        return policy.predict(obs)

    rate = evaluate(act, episodes=args.eval_episodes, image_size=96)
    blind = evaluate(lambda obs: act(obs, blank=True), episodes=args.eval_episodes, image_size=96)
    successes = round(rate * args.eval_episodes)
    report = {"tasks": {"synthetic reach": {"success_rate": rate, "episodes": args.eval_episodes,
                                            "ci95": list(wilson(successes, args.eval_episodes))},
                        "synthetic reach (image blanked)": {"success_rate": blind, "episodes": args.eval_episodes,
                                                            "ci95": list(wilson(round(blind * args.eval_episodes), args.eval_episodes))}},
              "training_minutes": round(minutes, 1), "max_steps": args.max_steps}  # fmt: skip
    (output / "eval_results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if args.install:
        target = ROOT / "src" / "hf_vla" / "assets" / "default_model"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            shutil.copy2(output / name, target / name)
        print(f"installed into {target}")


if __name__ == "__main__":
    main()
