"""Meta-World (MuJoCo) tasks as language-conditioned, camera-observed robot tasks, and expert demonstrations.

`MetaWorldEnv(task)` wraps one Meta-World v3 task: observations are what a VLA sees (`{"images": {"corner2": uint8
[S, S, 3]}, "instruction": str, "state": float32 [4]}`, state = hand xyz + gripper opening), actions are Meta-World's
4-D `[dx, dy, dz, gripper]` in [-1, 1], and `expert_action()` is the task's scripted policy (it reads the privileged
simulator state). Object placement is drawn from the reset seed, so seeds name episodes.

`generate_demonstrations(...)` runs the experts, keeps successful episodes only, and writes a LeRobot v3.0 dataset with
the task's instruction (what `hf-vla generate metaworld` calls).

    python -m hf_vla.sim.metaworld OUT_DIR --tasks drawer-open door-open --episodes 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .rendering import select_gl_backend

CAMERA = "corner2"
FPS = 80  # Meta-World steps the simulator 5 × 2.5 ms per action
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]
# Our own phrasing of each task, written so that paired tasks differ only in the verb that matters.
INSTRUCTIONS = {
    "button-press-topdown": "press the button down from above",
    "button-press": "press the button from the front",
    "coffee-button": "press the button on the coffee machine",
    "door-open": "open the door",
    "door-close": "close the door",
    "drawer-open": "open the drawer",
    "drawer-close": "close the drawer",
    "faucet-open": "open the faucet",
    "faucet-close": "close the faucet",
    "handle-press": "press the handle down",
    "lever-pull": "pull the lever up",
    "pick-place": "pick up the puck and place it at the goal",
    "plate-slide": "slide the plate into the goal",
    "push": "push the puck to the goal",
    "reach": "reach the goal position",
    "window-open": "slide the window open",
    "window-close": "slide the window closed",
}
EASY_TASKS = ("button-press-topdown", "drawer-open", "door-open", "plate-slide")


def task_name(task: str) -> str:
    """'drawer-open' for 'drawer-open', 'drawer-open-v3' or 'drawer_open'."""
    name = task.strip().replace("_", "-")
    return name[: -len("-v3")] if name.endswith("-v3") else name


def known_tasks() -> list[str]:
    """Meta-World's tasks that have a scripted expert, by `task_name`."""
    select_gl_backend()  # before metaworld (and mujoco) are imported
    from metaworld.policies import ENV_POLICY_MAP

    return sorted(task_name(t) for t in ENV_POLICY_MAP)


def distinct_task_names(tasks: Sequence[str]) -> list[str]:
    """`task_name` of each, refusing a task listed twice (under any spelling: its results would overwrite each
    other) and an unknown one, before any episode runs."""
    names = [task_name(t) for t in tasks]
    if not names:
        raise ValueError("tasks: expected at least one task")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tasks: {repeated} listed more than once (in {list(tasks)})")
    known = known_tasks()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"tasks: unknown Meta-World task(s) {unknown}; known tasks: {known}")
    return names


def instruction_for(task: str) -> str:
    name = task_name(task)
    return INSTRUCTIONS.get(name, name.replace("-", " "))


class MetaWorldEnv:
    """One Meta-World task rendered from the corner camera; see the module docstring.

    Args:
        task: task name with or without the "-v3" suffix (e.g. "drawer-open").
        image_size: side of the square camera image.
        max_steps: episode cap (`step` reports `done` when it is reached).
    """

    def __init__(self, task: str, image_size: int = 112, max_steps: int = 200):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
        self.task = task_name(task)
        known = known_tasks()
        if self.task not in known:
            raise ValueError(f"task: unknown Meta-World task {task!r}; known tasks: {known}")
        import metaworld
        from metaworld.policies import ENV_POLICY_MAP

        env_name = f"{self.task}-v3"
        self.instruction = instruction_for(self.task)
        self.image_size, self.max_steps = image_size, max_steps
        benchmark = metaworld.MT1(env_name, seed=0)
        env = benchmark.train_classes[env_name](
            render_mode="rgb_array", camera_name=CAMERA, width=image_size, height=image_size
        )
        env.set_task(benchmark.train_tasks[0])
        if not 1 <= max_steps <= env.max_path_length:  # Meta-World raises at the step after its own limit
            env.close()
            raise ValueError(f"max_steps: expected 1..{env.max_path_length} (Meta-World's episode limit), "
                             f"got {max_steps}")
        env.model.cam_pos[2] = [0.75, 0.075, 0.7]  # the corner2 placement LeRobot's Meta-World env uses
        # llvmpipe spends most of a frame on the shadow map and multisampling; without them a frame is ~10× cheaper
        env.model.vis.global_.offwidth = image_size
        env.model.vis.global_.offheight = image_size
        env.model.vis.quality.offsamples = 0
        env.model.vis.quality.shadowsize = 0
        env.reset()
        env._freeze_rand_vec = False  # draw object and goal positions from the reset seed
        env.seeded_rand_vec = True
        self.env = env
        self.expert = ENV_POLICY_MAP[env_name]()
        self.steps = 0
        self._raw: np.ndarray | None = None

    def reset(self, seed: int) -> dict:
        self.env.seed(int(seed))  # Meta-World ignores reset(seed=...); its own seed() drives the placement draw
        self._raw, _ = self.env.reset()
        # Meta-World moves the goal marker to the new goal only when it steps; without this the first frame of an
        # episode would show the previous episode's goal.
        for site in self.env._target_site_config:
            self.env._set_pos_site(*site)
        self.steps = 0
        return self.observation()

    def observation(self) -> dict:
        image = np.ascontiguousarray(self.env.render()[::-1, ::-1])  # the corner2 camera renders upside down
        state = self._raw[:4].astype(np.float32)
        return {"images": {CAMERA: image}, "instruction": self.instruction, "state": state}

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        """Applies one action (values outside [-1, 1] act as the bound); returns (observation, success, done)."""
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (4,):
            raise ValueError(f"action: expected shape [4] (dx, dy, dz, gripper), got {list(action.shape)}")
        if not np.isfinite(action).all():
            raise ValueError(f"action: expected finite values, got {action.tolist()}")
        self._raw, _, _, _, info = self.env.step(np.clip(action, -1.0, 1.0))
        self.steps += 1
        success = bool(info["success"])
        return self.observation(), success, success or self.steps >= self.max_steps

    def expert_action(self) -> np.ndarray:
        return np.asarray(self.expert.get_action(self._raw), dtype=np.float32)

    def close(self):
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def record_expert_episode(env: MetaWorldEnv, seed: int, frames_after_success: int = 10) -> dict | None:
    """Runs the expert from `seed`; the episode's frames if it succeeded, else None."""
    obs, images, states, actions = env.reset(seed), [], [], []
    succeeded_at = None
    while env.steps < env.max_steps:
        action = env.expert_action()
        images.append(obs["images"][CAMERA])
        states.append(obs["state"])
        actions.append(action)
        obs, success, _ = env.step(action)
        if success and succeeded_at is None:
            succeeded_at = env.steps
        if succeeded_at is not None and env.steps - succeeded_at >= frames_after_success:
            break
    if succeeded_at is None:
        return None
    return {
        "task": env.instruction,
        "frames": {
            f"observation.images.{CAMERA}": np.stack(images),
            "observation.state": np.stack(states),
            "action": np.clip(np.stack(actions), -1.0, 1.0).astype(np.float32),
        },
    }


def generate_demonstrations(
    out_dir,
    tasks: Sequence[str] = EASY_TASKS,
    episodes: int = 50,
    image_size: int = 112,
    seed: int = 0,
    max_steps: int = 300,
    frames_after_success: int = 10,
    max_attempts_per_episode: int = 3,
    video: bool = True,
    progress: bool = True,
) -> dict:
    """Writes `episodes` successful expert demonstrations per task as a LeRobot v3.0 dataset; returns a summary.

    Seeds `seed, seed + 1, ...` are tried per task until `episodes` succeed (at most `max_attempts_per_episode ×
    episodes` tries); evaluation seeds should lie elsewhere (`hf-vla eval metaworld` starts at 10 000).
    `out_dir` must be new or an empty folder: a dataset already there, or a crashed run's partial files, is
    refused.
    """
    from tqdm.auto import tqdm

    from ..data.lerobot_writer import LeRobotWriter

    if episodes < 1:
        raise ValueError(f"episodes: expected a positive integer, got {episodes}")
    tasks = distinct_task_names(tasks)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # a dataset, a crashed run's leftovers, other files
        raise FileExistsError(f"{out} exists and is not an empty folder; remove it or choose another output folder "
                              "(demonstrations are written into a new or empty one only)")
    start = time.perf_counter()
    writer = LeRobotWriter(out_dir, fps=FPS, robot_type="sawyer", video=video,
                           feature_names={"observation.state": STATE_NAMES, "action": ACTION_NAMES})  # fmt: skip
    summary = {"tasks": {}, "image_size": image_size, "fps": FPS}
    bar = tqdm(total=episodes * len(tasks), desc="expert demonstrations", unit="episode", disable=not progress)
    for task in tasks:
        kept = tried = frames = 0
        with MetaWorldEnv(task, image_size=image_size, max_steps=max_steps) as env:
            while kept < episodes and tried < max_attempts_per_episode * episodes:
                episode = record_expert_episode(env, seed + tried, frames_after_success)
                tried += 1
                if episode is None:
                    continue
                writer.add_episode(episode["frames"], episode["task"])
                kept += 1
                frames += len(episode["frames"]["action"])
                bar.update(1)
                bar.set_postfix(task=task, failed=tried - kept)
        summary["tasks"][task] = {"instruction": instruction_for(task), "episodes": kept, "tried": tried,
                                  "frames": frames}  # fmt: skip
        if kept < episodes:
            bar.write(f"{task}: the expert succeeded in only {kept} of {tried} tries")
    bar.close()
    writer.finalize()
    summary["frames"] = writer.total_frames
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["path"] = str(Path(out_dir))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write Meta-World expert demonstrations as a LeRobot v3.0 dataset.")
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    return run_generate(args)


def add_generate_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("out", help="output directory of the LeRobot dataset (new, or an empty folder)")
    parser.add_argument("--tasks", nargs="+", default=list(EASY_TASKS), help="Meta-World task names")
    parser.add_argument("--episodes", type=int, default=50, help="successful episodes per task")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0, help="first environment seed")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--images", action="store_true", help="store PNG images in the parquet instead of mp4 video")


def run_generate(args) -> int:
    import json

    summary = generate_demonstrations(args.out, tasks=args.tasks, episodes=args.episodes, image_size=args.image_size,
                                      seed=args.seed, max_steps=args.max_steps, video=not args.images)  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
