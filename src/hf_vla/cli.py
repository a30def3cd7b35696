"""The `hf-vla` command."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def load_policy(path, option: str = "--model", **kwargs):
    """`VLAPolicy.from_pretrained(path, **kwargs)` for a command-line option: a missing directory or a hub id that
    cannot be fetched is a ValueError naming the option (`main` prints it as one line) instead of an OSError."""
    from pathlib import Path

    from .policy import VLAPolicy

    local = Path(path).expanduser()
    # a path, not a hub id (those are "name" or "namespace/name"): e.g. outputs/run/checkpoint-500
    if (str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1) and not local.exists():
        raise FileNotFoundError(f"{option}: no such directory {str(path)!r}")
    if local.exists() and not local.is_dir():
        raise ValueError(f"{option}: {str(path)!r} is a file; expected a model directory or a hub id")
    if local.is_dir() and not (local / "config.json").is_file():  # a dataset, a run that never saved, ...
        raise ValueError(f"{option}: {str(path)!r} is a directory without config.json, not a saved model")
    try:
        return VLAPolicy.from_pretrained(str(local) if local.exists() else path, **kwargs)  # "~/run" is a path
    except OSError as error:  # transformers: not a local folder and not on the Hub (or offline and not cached)
        nor_local = "" if local.exists() else f" (nor is it a local directory under {str(Path.cwd())!r})"
        raise ValueError(f"{option}: cannot load {str(path)!r}: {' '.join(str(error).split())}{nor_local}") from error


def demo(args) -> int:
    import json
    from pathlib import Path

    from .defaults import default_model_dir, example_observation

    path = args.model or default_model_dir()
    policy = load_policy(path)
    obs = example_observation()
    if set(obs["images"]) != set(policy.processor.camera_names):  # another model: the example view for each camera
        view = next(iter(obs["images"].values()))
        obs["images"] = {camera: view for camera in policy.processor.camera_names}
    if args.instruction:
        obs["instruction"] = args.instruction
    state_note = ""
    if policy.processor.state_dim:  # the example has no state: a typical one of the embodiment
        key = policy.processor.embodiment_key(args.unnorm_key, "--unnorm-key")
        stats = policy.processor.norm_stats[key]["state"]
        typical = stats.get("mean") or [(low + high) / 2 for low, high in zip(stats["min"], stats["max"])]
        obs["state"] = np.asarray(typical, np.float32)
        state_note = f"; state {np.array2string(obs['state'], precision=3)} (the {key!r} statistics' typical state)"
    actions = policy.predict(obs, unnorm_key=args.unnorm_key)
    print(f"model: {path} ({type(policy.model).__name__})")
    results = Path(path) / "eval_results.json"
    if results.is_file():
        rows = json.loads(results.read_text()).get("tasks", {})
        shown = [f"{name} {row['success_rate']:.0%}" for name, row in rows.items() if "(" not in name]
        if shown:
            print("closed-loop success: " + ", ".join(shown))
    print(f"instruction: {obs['instruction']!r}; cameras: {list(obs['images'])}{state_note}")
    print(f"action chunk [T={actions.shape[0]}, D={actions.shape[1]}] in robot units:")
    with np.printoptions(precision=4, suppress=True, linewidth=120):
        print(actions)
    return 0


def push(args) -> int:
    from .hub import push_model

    url = push_model(args.model_dir, args.repo_id, private=args.private, license=args.license,
                     license_name=args.license_name, license_link=args.license_link, datasets=args.dataset or None,
                     revision=args.revision, remote_code=args.remote_code, write_card=not args.no_card)  # fmt: skip
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")
    return 0


SERVE_MODULES = {"websockets", "msgpack"}  # what the `serve` extra installs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert-starvla"]:  # its own argument parser
        from .hub.convert_starvla import main as convert_main

        return convert_main(argv[1:])
    parser = argparse.ArgumentParser(prog="hf-vla", description="Vision-language-action policies on Hugging Face")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="predict an action chunk for the bundled example observation")
    p.add_argument("--model", help="model directory or hub id (default: the embedded tiny model)")
    p.add_argument("--instruction", help="override the example instruction")
    p.add_argument("--unnorm-key", help="embodiment statistics to decode with")
    p.set_defaults(func=demo)
    p = commands.add_parser("push", help="upload a model directory with a generated model card to the Hub")
    p.add_argument("model_dir")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", help="the card's licence id (default: the base VLM's, read from its Hub card, else "
                                     "apache-2.0)")
    p.add_argument("--license-name", help="with --license other: the licence's name, e.g. qwen-research")
    p.add_argument("--license-link", help="with --license other: where the licence text is")
    p.add_argument("--dataset", action="append", help="hub id of a training dataset (repeatable)")
    p.add_argument("--revision")
    p.add_argument("--remote-code", action="store_true", help="also ship self-contained modules (trust_remote_code)")
    p.add_argument("--no-card", action="store_true", help="upload README.md as it is instead of generating the card")
    p.set_defaults(func=push)
    p = commands.add_parser("serve", help="serve a model over openpi's websocket protocol (needs the `serve` extra)")
    try:
        from .serving.server import add_arguments, run_from_args
    except ModuleNotFoundError as err:  # without the `serve` extra every other command still works
        if (err.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        if argv[:1] == ["serve"]:
            raise SystemExit(f"hf-vla serve: needs the 'serve' extra (module {err.name!r} is missing): "
                             "pip install 'hf_vla[serve]'") from None
    else:
        add_arguments(p)
        p.set_defaults(func=run_from_args)
    p = commands.add_parser("generate", help="write simulator expert demonstrations as a LeRobot dataset")
    simulators = p.add_subparsers(dest="simulator", required=True)
    p = simulators.add_parser("metaworld", help="Meta-World scripted experts (needs the `sim` extra)")
    from .sim.metaworld import add_generate_arguments, run_generate

    add_generate_arguments(p)
    p.set_defaults(func=run_generate)
    p = commands.add_parser("eval", help="closed-loop evaluation in a simulator")
    simulators = p.add_subparsers(dest="simulator", required=True)
    p = simulators.add_parser("metaworld", help="Meta-World success rates (needs the `sim` extra)")
    from .sim.evaluation import add_eval_arguments, run_eval

    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
    commands.add_parser("convert-starvla", help="convert a StarVLA run directory or checkpoint (see --help there)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: its message, not a traceback
        parser.exit(2, f"hf-vla {args.command}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
