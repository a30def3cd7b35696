"""The embedded default model and example observation used by `hf-vla demo`, the Space and the benchmarks.

Until a trained default ships, the default is the tiny OFT model built offline from a random Qwen2.5-VL backbone;
everything that shows its output says so.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_INSTRUCTION = "put the carrot on the plate"
# Bridge-like units: xyz and rpy deltas, gripper open (1) / closed (0).
DEFAULT_ACTION_SCALE = np.array([0.02, 0.02, 0.02, 0.05, 0.05, 0.05, 1.0], dtype=np.float32)


def cache_dir() -> Path:
    return Path(os.environ.get("HF_VLA_HOME", Path.home() / ".cache" / "hf_vla"))


def example_image() -> np.ndarray:
    """A 224×224 tabletop scene (uint8 [H, W, 3]) bundled with the package."""
    with resources.files("hf_vla.assets").joinpath("example_scene.png").open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def example_observation() -> dict:
    return {"images": {"primary": example_image()}, "instruction": DEFAULT_INSTRUCTION, "state": np.zeros(7, np.float32)}


def synthetic_statistics(num: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Actions and states with bridge-like ranges, for the default model's normalisation statistics."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, size=(num, 7)).astype(np.float32) * DEFAULT_ACTION_SCALE
    actions[:, 6] = rng.integers(0, 2, size=num)
    states = rng.uniform(-0.5, 0.5, size=(num, 7)).astype(np.float32)
    return actions, states


def build_default_model(out_dir: str | os.PathLike, action_horizon: int = 8) -> str:
    """Writes the tiny default OFT model directory (model, processor, statistics) and returns its path."""
    from .auto import AutoModelForVLA
    from .processing_vla import VLAProcessor
    from .testing import build_tiny_vlm

    out = Path(out_dir)
    vlm_dir = build_tiny_vlm(out / "backbone", family="qwen2_5_vl")
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="oft", action_dim=7, action_horizon=action_horizon, state_dim=7)
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary"], image_size=[112, 112])
    actions, states = synthetic_statistics()
    processor.compute_norm_stats("bridge", actions, states, action_mode=["q99"] * 6 + ["binary"], state_mode="q99")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def default_model_dir() -> str:
    """The default model directory, built on first use."""
    path = cache_dir() / "default-oft-tiny"
    if not (path / "config.json").exists():
        build_default_model(path)
    return str(path)
