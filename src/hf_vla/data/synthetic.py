"""A tiny tabletop reaching task that needs both the image and the instruction, rendered with PIL.

Two blocks (red and blue) lie at random places on a table; the instruction names one of them; the gripper (seen from
above) must move onto it and close. Actions are bridge-like 7-D deltas `[dx, dy, dz, droll, dpitch, dyaw, gripper]`
(only dx, dy and the gripper vary); the state is the gripper's `[x, y, z, roll, pitch, yaw, gripper]`.

It gives the embedded default model something real to learn (`ReachEnv` runs the closed loop, `expert_action` is the
scripted demonstrator, `write_reach_dataset` writes LeRobot v3 demonstrations), until simulator-trained defaults land.

    python -m hf_vla.data.synthetic OUT_DIR [--episodes 200]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (210, 40, 40), "blue": (40, 80, 220)}
INSTRUCTIONS = {"red": "move to the red block", "blue": "move to the blue block"}
MAX_STEP = 0.04  # per-step move, in table units ([0, 1] across the image)
REACHED = 0.03


@dataclass
class ReachEnv:
    """Closed-loop version of the task: `reset(seed)` → observation, `step(action)` → (observation, success)."""

    image_size: int = 96
    max_steps: int = 60
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def reset(self, seed: int | None = None, target: str | None = None) -> dict:
        rng = np.random.default_rng(seed) if seed is not None else self.rng
        while True:
            blocks = rng.uniform(0.15, 0.85, size=(2, 2))
            if np.linalg.norm(blocks[0] - blocks[1]) > 0.3:
                break
        self.blocks = {"red": blocks[0], "blue": blocks[1]}
        self.target = target or ("red" if rng.random() < 0.5 else "blue")
        self.position = rng.uniform(0.2, 0.8, size=2)
        self.gripper, self.steps = 1.0, 0
        return self.observation()

    def observation(self) -> dict:
        state = np.array([*self.position, 0.0, 0.0, 0.0, 0.0, self.gripper], dtype=np.float32)
        return {"images": {"primary": self.render()}, "instruction": INSTRUCTIONS[self.target], "state": state}

    def render(self) -> np.ndarray:
        size = self.image_size
        image = Image.new("RGB", (size, size), (150, 110, 75))
        draw = ImageDraw.Draw(image)
        half = size * 0.06
        for name, (x, y) in self.blocks.items():
            draw.rectangle((x * size - half, y * size - half, x * size + half, y * size + half), fill=COLORS[name])
        x, y = self.position * size
        radius = size * (0.07 if self.gripper > 0.5 else 0.045)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(240, 240, 240), width=max(1, size // 48))
        return np.asarray(image)

    @property
    def success(self) -> bool:
        return bool(np.linalg.norm(self.position - self.blocks[self.target]) < REACHED and self.gripper < 0.5)

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        action = np.asarray(action, dtype=np.float64)
        self.position = np.clip(self.position + np.clip(action[:2], -MAX_STEP, MAX_STEP), 0.0, 1.0)
        self.gripper = 1.0 if action[6] > 0.5 else 0.0
        self.steps += 1
        return self.observation(), self.success


def expert_action(env: ReachEnv) -> np.ndarray:
    """Straight to the named block at most MAX_STEP per step, then close the gripper."""
    delta = env.blocks[env.target] - env.position
    distance = np.linalg.norm(delta)
    move = delta if distance <= MAX_STEP else delta / distance * MAX_STEP
    close = distance < REACHED
    return np.array([*(np.zeros(2) if close else move), 0, 0, 0, 0, 0.0 if close else 1.0], dtype=np.float32)


def rollout_expert(env: ReachEnv, seed: int) -> dict:
    obs = env.reset(seed)
    images, states, actions = [], [], []
    for _ in range(env.max_steps):
        action = expert_action(env)
        images.append(obs["images"]["primary"])
        states.append(obs["state"])
        actions.append(action)
        obs, success = env.step(action)
        if success:
            break
    # a few frames holding still after success, so chunks near the end see the "stay closed" behaviour
    for _ in range(3):
        images.append(obs["images"]["primary"])
        states.append(obs["state"])
        actions.append(expert_action(env))
        obs, _ = env.step(actions[-1])
    return {
        "task": INSTRUCTIONS[env.target],
        "frames": {
            "observation.images.primary": np.stack(images),
            "observation.state": np.stack(states).astype(np.float32),
            "action": np.stack(actions).astype(np.float32),
        },
    }


def write_reach_dataset(root, episodes: int = 200, image_size: int = 96, seed: int = 0, video: bool = False):
    """Writes `episodes` expert demonstrations as a LeRobot v3.0 dataset; returns its path."""
    from .lerobot_writer import write_lerobot_dataset

    env = ReachEnv(image_size=image_size)
    demos = (rollout_expert(env, seed * 100_000 + i) for i in range(episodes))
    return write_lerobot_dataset(root, demos, fps=10, robot_type="synthetic_reach", video=video)


def evaluate(policy_fn, episodes: int = 20, seed: int = 10_000, image_size: int = 96, execute_steps: int = 4):
    """Success rate of `policy_fn(observation) -> [T, 7]` on unseen seeds, executing `execute_steps` per chunk."""
    env, successes = ReachEnv(image_size=image_size), 0
    for episode in range(episodes):
        obs, done = env.reset(seed + episode), False
        while not done and env.steps < env.max_steps:
            for action in policy_fn(obs)[:execute_steps]:
                obs, done = env.step(action)
                if done or env.steps >= env.max_steps:
                    break
        successes += done
    return successes / episodes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the synthetic reaching demonstrations.")
    parser.add_argument("out_dir")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    path = write_reach_dataset(args.out_dir, args.episodes, args.image_size)
    print(f"wrote {path}")
