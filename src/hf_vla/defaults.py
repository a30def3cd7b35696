"""The embedded default model and example inputs used by `hf-vla demo`, the Space and the benchmarks.

The default model ships inside the package (`hf_vla/assets/default_model`, 4.3 MB): a tiny OFT policy on a random-init
Qwen2.5-VL-shaped backbone, trained from scratch on CPU on Meta-World expert demonstrations by
`trainers/train_metaworld.py --install` (its recipe, training metrics and closed-loop evaluation ship beside the
weights). It sees the corner camera (112×112) and an instruction, takes no state, and returns 8 × 4 Meta-World actions
`[dx, dy, dz, gripper]`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

# Meta-World scenes bundled as examples (first frames of unseen seeds), with their instructions.
EXAMPLE_TASKS = {
    "drawer-open": "open the drawer",
    "button-press-topdown": "press the button down from above",
    "door-open": "open the door",
    "plate-slide": "slide the plate into the goal",
    "faucet-open": "open the faucet",
}
DEFAULT_INSTRUCTION = EXAMPLE_TASKS["drawer-open"]
DEFAULT_CAMERA = "corner2"
# Bridge-like units for benchmark models: xyz and rpy deltas, gripper open (1) / closed (0).
DEFAULT_ACTION_SCALE = np.array([0.02, 0.02, 0.02, 0.05, 0.05, 0.05, 1.0], dtype=np.float32)


def _asset(*parts: str) -> Path:
    path = resources.files("hf_vla.assets")
    for part in parts:  # one part per joinpath: Python 3.11's namespace-package paths take no more
        path = path.joinpath(part)
    return Path(str(path))


def default_model_dir() -> str:
    """Directory of the embedded default model (trained on Meta-World)."""
    path = _asset("default_model")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded default model is missing from {path}; "
                                "reproduce it with `python trainers/train_metaworld.py --install`")  # fmt: skip
    return str(path)


def example_image() -> np.ndarray:
    """A 224×224 tabletop scene (uint8 [H, W, 3]) bundled with the package."""
    with resources.files("hf_vla.assets").joinpath("example_scene.png").open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def metaworld_example(task: str = "drawer-open") -> np.ndarray:
    """The first corner-camera frame (uint8 [112, 112, 3]) of a Meta-World episode the default model never saw."""
    if task not in EXAMPLE_TASKS:
        raise ValueError(f"task: expected one of {list(EXAMPLE_TASKS)}, got {task!r}")
    return np.asarray(Image.open(_asset("metaworld", f"{task}.png")).convert("RGB"))


def example_observation(task: str = "drawer-open") -> dict:
    """An observation the default model understands: one Meta-World camera view and its task's instruction."""
    return {"images": {DEFAULT_CAMERA: metaworld_example(task)}, "instruction": EXAMPLE_TASKS[task]}


def synthetic_statistics(num: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Actions and states with bridge-like ranges, for benchmark models' normalisation statistics."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, size=(num, 7)).astype(np.float32) * DEFAULT_ACTION_SCALE
    actions[:, 6] = rng.integers(0, 2, size=num)
    states = rng.uniform(-0.5, 0.5, size=(num, 7)).astype(np.float32)
    return actions, states


if __name__ == "__main__":
    print("embedded default model:", default_model_dir())
    observation = example_observation()
    views = {camera: list(image.shape) for camera, image in observation["images"].items()}
    print(f"example observation: {views}, {observation['instruction']!r}")
    actions, states = synthetic_statistics()
    scale = np.array2string(DEFAULT_ACTION_SCALE, precision=3)
    print(f"synthetic statistics: actions {list(actions.shape)} in ±{scale}, "
          f"states {list(states.shape)}")
