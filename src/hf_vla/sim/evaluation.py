"""Closed-loop evaluation of a policy on Meta-World: per-task success with Wilson intervals, a report, a plot, videos.

A policy here is any `policy(observation) -> float [T, D]` (an action chunk in robot units): `VLAPolicy.predict` in
process, or `ServerPolicy` (the openpi protocol, through `hf_vla.serving.client`). The loop executes the first
`execute_steps` actions of each chunk, then asks again, until the task succeeds or `max_steps` pass. A policy with an
`action_horizon` attribute (both of those) refuses an `execute_steps` beyond it. A chunk that is not finite (FAST's
undecodable ones; `hf-vla serve` answers them with an error) ends its episode as a failure, counted in the report.
Each episode runs with Python's, NumPy's and torch's global generators seeded from its seed (and restored after), so a
policy that samples (flow-matching heads draw their noise from torch) repeats its episodes whatever ran before; a
served policy samples with the server's generators instead.

Conditions for ablations: `blank_image=True` replaces every camera view by black pixels, and `instructions` overrides
the instruction per task (e.g. faucet-open evaluated with "close the faucet").

    python -m hf_vla.sim.evaluation --model MODEL_DIR --tasks drawer-open door-open --episodes 10
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .metaworld import CAMERA, EASY_TASKS, FPS, MetaWorldEnv, distinct_task_names, task_name

EVAL_SEED = 10_000  # demonstrations use seeds from 0, so evaluation episodes are unseen placements


def wilson_interval(successes: int, episodes: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a success rate (scipy's binomial test)."""
    from scipy.stats import binomtest

    if episodes == 0:
        return (0.0, 1.0)
    interval = binomtest(successes, episodes).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(interval.low), float(interval.high))


class UndecodableChunk(ValueError):
    """The policy returned no action to execute: a chunk with NaN / inf (e.g. FAST tokens that do not decode)."""

    def __init__(self, message: str, steps: int = 0):
        super().__init__(message)
        self.steps = steps


@dataclass
class TaskResult:
    task: str
    instruction: str
    successes: int = 0
    episodes: int = 0
    steps: list[int] = field(default_factory=list)
    undecodable: int = 0  # episodes ended (as failures) by a chunk without valid actions

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict:
        low, high = wilson_interval(self.successes, self.episodes)
        return {"instruction": self.instruction, "successes": self.successes, "episodes": self.episodes,
                "success_rate": round(self.success_rate, 4), "ci95": _interval(low, high),
                "mean_episode_steps": round(float(np.mean(self.steps)), 1) if self.steps else None,
                "undecodable_episodes": self.undecodable}  # fmt: skip


@dataclass
class EvalConfig:
    tasks: Sequence[str] = EASY_TASKS
    episodes: int = 20
    seed: int = EVAL_SEED
    execute_steps: int = 4
    max_steps: int = 200
    image_size: int = 112
    blank_image: bool = False
    instructions: Mapping[str, str] | None = None  # task → instruction given to the policy instead of its own
    video_dir: str | None = None  # first episode of each task as an mp4, when set


def _interval(low: float, high: float) -> list[float]:
    # 6 places: the card shows percentages to one decimal, which a 4-place value would round a second time
    return [round(low, 6), round(high, 6)]


@contextmanager
def seeded_randomness(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators seeded from `seed` inside, and restored after (a training
    run that evaluates in between keeps its own random stream)."""
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def run_episode(env: MetaWorldEnv, policy: Callable, seed: int, config: EvalConfig, instruction: str,
                frames: list | None = None) -> tuple[bool, int]:
    """One closed-loop episode; returns (success, environment steps). Appends the rendered frames to `frames`.
    `seed` places the objects and seeds the policy's sampling (`seeded_randomness`).
    Raises `UndecodableChunk` when the policy returns a chunk that is not finite: there is nothing to execute."""
    with seeded_randomness(seed):
        return _run_episode(env, policy, seed, config, instruction, frames)


def _run_episode(env: MetaWorldEnv, policy: Callable, seed: int, config: EvalConfig, instruction: str,
                 frames: list | None) -> tuple[bool, int]:
    obs, success, done = env.reset(seed), False, False
    if frames is not None:
        frames.append(obs["images"][CAMERA])
    while not done:
        query = {"images": obs["images"], "instruction": instruction, "state": obs["state"]}
        if config.blank_image:
            query["images"] = {name: np.zeros_like(view) for name, view in obs["images"].items()}
        try:
            chunk = np.asarray(policy(query), dtype=np.float32)
        except UndecodableChunk as error:  # raised by the policy itself (a server's error reply): count the steps
            error.steps = env.steps
            raise
        if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != 4:
            raise ValueError(f"policy: expected an action chunk [T ≥ 1, 4], got shape {list(chunk.shape)}")
        if not np.isfinite(chunk).all():
            raise UndecodableChunk("policy: the action chunk holds NaN or inf (e.g. FAST tokens that do not decode)",
                                   env.steps)
        for action in chunk[: config.execute_steps]:
            obs, success, done = env.step(action)
            if frames is not None:
                frames.append(obs["images"][CAMERA])
            if done:
                break
    return success, env.steps


def evaluate(policy: Callable, config: EvalConfig, progress: bool = True) -> dict:
    """Runs `config.episodes` episodes per task on seeds `config.seed, config.seed + 1, ...`; returns the report."""
    from tqdm.auto import tqdm

    tasks = distinct_task_names(config.tasks)
    for name in ("episodes", "execute_steps"):
        if getattr(config, name) < 1:  # no episode would end (or none would run, and 0/0 read as 0% success)
            raise ValueError(f"{name}: expected a positive integer, got {getattr(config, name)}")
    if config.seed < 0:  # Meta-World's seeding refuses it, but only at the first episode and with a traceback
        raise ValueError(f"seed: expected a non-negative integer, got {config.seed}")
    horizon = getattr(policy, "action_horizon", None)
    if horizon is not None and config.execute_steps > horizon:  # the chunks would silently cap it
        raise ValueError(f"execute_steps: expected 1..{horizon} (the policy's action chunk length), "
                         f"got {config.execute_steps}")
    instructions = {task_name(task): text for task, text in (config.instructions or {}).items()}
    unknown = sorted(set(instructions) - set(tasks))
    if unknown:
        raise ValueError(f"instructions: {unknown} are not among the evaluated tasks {tasks}")
    results, env_steps, start = {}, 0, time.perf_counter()
    bar = tqdm(total=config.episodes * len(tasks), desc="closed-loop episodes", unit="episode", disable=not progress)
    for task in tasks:
        with MetaWorldEnv(task, image_size=config.image_size, max_steps=config.max_steps) as env:
            instruction = instructions.get(task, env.instruction)
            result = results[task] = TaskResult(task, instruction)
            for episode in range(config.episodes):
                frames = [] if config.video_dir and episode == 0 else None
                try:
                    success, steps = run_episode(env, policy, config.seed + episode, config, instruction, frames)
                except UndecodableChunk as error:  # a failed episode, as one that times out; the report counts them
                    success, steps = False, error.steps
                    result.undecodable += 1
                result.successes += success
                result.episodes += 1
                result.steps.append(steps)
                env_steps += steps
                if frames:
                    write_video(Path(config.video_dir) / f"{task}.mp4", frames)
                bar.update(1)
                bar.set_postfix(task=task, success=f"{result.successes}/{result.episodes}")
    bar.close()
    seconds = time.perf_counter() - start
    total = sum(r.successes for r in results.values())
    episodes = sum(r.episodes for r in results.values())
    low, high = wilson_interval(total, episodes)
    settings = {k: v for k, v in asdict(config).items() if k not in ("tasks", "video_dir")}
    return {
        "benchmark": "metaworld",
        "tasks": {task: result.as_dict() for task, result in results.items()},
        "average": {"successes": total, "episodes": episodes, "success_rate": round(total / max(episodes, 1), 4),
                    "ci95": _interval(low, high),
                    "undecodable_episodes": sum(r.undecodable for r in results.values())},  # fmt: skip
        "settings": settings,
        "seconds": round(seconds, 1),
        "env_steps": env_steps,
        "env_steps_per_second": round(env_steps / seconds, 1),
    }


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = FPS // 4):
    """Frames (uint8 [H, W, 3]) as an H.264 mp4, played at a quarter of real time so the motion can be followed."""
    from ..data.lerobot_writer import CODECS, VideoFileWriter

    video = np.stack(frames)
    height, width = video.shape[1:3]
    writer = VideoFileWriter(Path(path), fps, "h264", gop=fps, crf=CODECS["h264"][3])
    writer.write(video[:, : height - height % 2, : width - width % 2])  # yuv420p needs even sides
    writer.close()


def plot_report(report: Mapping, path: Path, title: str = "Meta-World closed-loop success"):
    """Bar chart of per-task success rates with their 95% intervals (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    rates = np.array([report["tasks"][t]["success_rate"] for t in tasks])
    intervals = np.array([report["tasks"][t]["ci95"] for t in tasks])
    errors = np.stack([rates - intervals[:, 0], intervals[:, 1] - rates])
    figure, axis = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.6))
    axis.bar(range(len(tasks)), rates, yerr=errors, capsize=4, color="#4C72B0")
    axis.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("success rate (95% Wilson interval)")
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(report: Mapping, out_dir, label: str | None = None) -> dict[str, Path]:
    """report.json and success.png under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.json", "plot": out / "success.png"}
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, paths["plot"], title=label or "Meta-World closed-loop success")
    return paths


def add_to_model_card_results(report: Mapping, model_dir, suffix: str = "") -> Path:
    """Merges the per-task rows into `<model_dir>/eval_results.json`, which the generated model card tabulates."""
    path = Path(model_dir).expanduser() / "eval_results.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    tasks = dict(existing.get("tasks", {}))
    for task, row in report["tasks"].items():
        name = f"metaworld/{task}{suffix}"
        tasks[name] = {"success_rate": row["success_rate"], "episodes": row["episodes"], "ci95": row["ci95"]}
    existing["tasks"] = tasks
    path.write_text(json.dumps(existing, indent=2) + "\n")
    return path


class ServerPolicy:
    """An openpi-protocol policy server as a policy callable (`hf-vla serve` or any compatible server)."""

    def __init__(self, uri: str, api_key: str | None = None, unnorm_key: str | None = None):
        from ..serving.client import PolicyClient

        self.client = PolicyClient(uri, port=None, api_key=api_key)
        self.metadata = self.client.metadata
        self.action_horizon = self.metadata.get("action_chunk_size")  # the steps a reply holds; other servers: None
        self.unnorm_key = unnorm_key

    def __call__(self, obs: Mapping) -> np.ndarray:
        request = {"images": dict(obs["images"]), "prompt": obs["instruction"]}
        if obs.get("state") is not None:  # a stateless model may still decode relative actions from it
            request["state"] = obs["state"]
        if self.unnorm_key is not None:
            request["unnorm_key"] = self.unnorm_key
        from ..serving.client import ServerError
        from ..serving.protocol import UNDECODABLE_CHUNK

        try:
            reply = self.client.infer(request)
        except ServerError as error:  # hf-vla serve refuses to send a chunk that does not decode
            if UNDECODABLE_CHUNK in str(error):
                raise UndecodableChunk(str(error)) from None
            raise
        if not isinstance(reply, Mapping) or "actions" not in reply:  # another server's reply shape
            got = sorted(reply) if isinstance(reply, Mapping) else type(reply).__name__
            raise ServerError(f"expected a reply with 'actions' [T, D], got {got}", reply)
        return reply["actions"]

    def close(self):
        self.client.close()


class InProcessPolicy:
    """`VLAPolicy.predict` as a policy callable (a stateless model still gets the state: relative actions are made
    absolute from it). `model`: a `VLAPolicy`, or a model directory / hub id to load one from."""

    def __init__(self, model, unnorm_key: str | None = None):
        from ..policy import VLAPolicy

        self.policy = model if isinstance(model, VLAPolicy) else VLAPolicy.from_pretrained(model)
        self.unnorm_key = unnorm_key
        self.action_horizon = self.policy.processor.action_horizon

    def __call__(self, obs: Mapping) -> np.ndarray:
        return self.policy.predict(dict(obs), unnorm_key=self.unnorm_key)

    def close(self):
        pass


def swapped_instructions(tasks: Sequence[str]) -> dict[str, str]:
    """Each task gets the next task's instruction (a swap for two tasks): the language-grounding ablation."""
    from .metaworld import instruction_for

    names = distinct_task_names(tasks)
    if len(names) < 2:
        raise ValueError(f"tasks: swapping instructions needs at least two tasks, got {names}")
    return {task: instruction_for(names[(i + 1) % len(names)]) for i, task in enumerate(names)}


def add_eval_arguments(parser):
    parser.add_argument("--model", help="model directory or hub id (in-process VLAPolicy)")
    parser.add_argument("--server", help="ws://host:port of a policy server, instead of --model")
    parser.add_argument("--api-key", help="the server's API key")
    parser.add_argument("--unnorm-key", help="statistics to decode actions with (sent to the server with --server)")
    parser.add_argument("--tasks", nargs="+", default=list(EASY_TASKS))
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="first episode seed")
    parser.add_argument("--execute-steps", type=int, default=4, help="actions executed per predicted chunk")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--blank-image", action="store_true", help="ablation: black camera images")
    parser.add_argument("--swap-instructions", action="store_true",
                        help="ablation: give each task the next listed task's instruction")
    parser.add_argument("--out", default="eval/metaworld", help="directory for report.json, success.png, videos/")
    parser.add_argument("--no-video", action="store_true")
    parser.add_argument("--add-to-card", action="store_true",
                        help="merge the results into the model directory's eval_results.json (model card table)")


def run_eval(args) -> int:
    if bool(args.model) == bool(args.server):
        raise SystemExit("hf-vla eval metaworld: give exactly one of --model DIR or --server ws://host:port")
    # refused before, not after, the episodes
    if args.add_to_card and not (args.model and Path(args.model).expanduser().is_dir()):
        given = f"--server {args.server}" if args.server else f"--model {args.model!r} (not a local directory)"
        raise ValueError(f"--add-to-card: expected --model to name a local model directory (its eval_results.json is "
                         f"updated), got {given}")
    instructions = swapped_instructions(args.tasks) if args.swap_instructions else None
    config = EvalConfig(tasks=args.tasks, episodes=args.episodes, seed=args.seed, execute_steps=args.execute_steps,
                        max_steps=args.max_steps, image_size=args.image_size, blank_image=args.blank_image,
                        instructions=instructions, video_dir=None if args.no_video else str(Path(args.out) / "videos"))  # fmt: skip
    refusals = ()  # errors that are the user's input, not a crash: one line, as for --model
    if args.server:
        from websockets.exceptions import WebSocketException

        from ..serving.client import ServerError

        refusals = (ServerError,)  # the server refused a request: a camera the model lacks, an unknown --unnorm-key
        try:
            policy = ServerPolicy(args.server, args.api_key, unnorm_key=args.unnorm_key)
        except (OSError, WebSocketException) as error:  # refused, unknown host, timed out, HTTP 401, ...
            hint = ""
            if isinstance(error, ConnectionRefusedError):  # often `hf-vla serve ... &` still loading its model
                health = args.server.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")
                hint = (" (a server started moments ago listens only once its model has loaded: wait until "
                        f"{health}/healthz answers)")
            raise ValueError(f"--server: cannot connect to {args.server!r}: {error}{hint}") from error
    else:
        from ..cli import load_policy

        policy = InProcessPolicy(load_policy(args.model), args.unnorm_key)
    try:
        report = evaluate(policy, config)
    except refusals as error:
        raise ValueError(f"--server: {args.server} answered with an error: {error}") from error
    finally:
        policy.close()
    report["model"] = args.model or args.server
    condition = ", ".join(c for c, on in (("image blanked", args.blank_image),
                                          ("instructions swapped", args.swap_instructions)) if on)  # fmt: skip
    report["condition"] = condition or "standard"
    paths = write_report(report, args.out, label=f"{report['model']} ({report['condition']})")
    for task, row in report["tasks"].items():
        low, high = row["ci95"]
        print(f"{task:24s} {row['successes']:3d}/{row['episodes']:<3d} {row['success_rate']:6.1%}  "
              f"95% CI [{low:.2f}, {high:.2f}]  instruction: {row['instruction']!r}")
    average = report["average"]
    print(f"{'average':24s} {average['successes']:3d}/{average['episodes']:<3d} {average['success_rate']:6.1%}  "
          f"({report['env_steps_per_second']} env steps/s, {report['seconds']} s)")
    if average["undecodable_episodes"]:  # failures of another kind than missing the goal: say so
        print(f"{average['undecodable_episodes']} episode(s) ended on an action chunk that did not decode (NaN)")
    print(f"wrote {paths['report']} and {paths['plot']}")
    if args.add_to_card:
        suffix = f" ({report['condition']})" if condition else ""
        print(f"updated {add_to_model_card_results(report, args.model, suffix)}")
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Closed-loop Meta-World evaluation of a VLA policy.")
    add_eval_arguments(parser)
    try:
        return run_eval(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as error:  # bad input: its message, not a traceback (as `hf-vla eval`)
        parser.exit(2, f"{parser.prog}: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())
