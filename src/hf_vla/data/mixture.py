"""Weighted mixtures of robot datasets, aligned across embodiments (StarVLA's LeRobot mixture, map-style).

`VLAMixture([MixtureEntry(dataset, weight, embodiment, normalization), ...], seed=0)` or, from a YAML file (or the
same structure as a dict), `load_mixture("mix.yaml", action_horizon=16)`:

    seed: 0                      # optional, default 0
    balance_by_length: false     # optional; true samples a dataset with probability ∝ weight × its number of frames
    datasets:
      - path: bridge_lerobot     # LeRobot dataset folder; a relative path is resolved against the YAML's folder
        weight: 1.0              # optional, default 1.0; must be > 0
        embodiment: bridge       # optional, default the folder name; the statistics key (`unnorm_key`)
        cameras: {observation.images.image_0: primary}   # optional: a list selects, a dict selects and renames
        action_mode: delta       # optional: abs (default) | delta | rel, or one per dimension, as in `load_lerobot`
        state_key: observation.state                      # optional; null for none
        action_key: action       # optional
        normalization: {action: [q99, q99, q99, q99, q99, q99, binary], state: q99}   # optional, default q99

Sampling. `mixture[i]` is a pure function of (seed, epoch, i): a numpy Generator seeded with [seed, epoch, i] picks a
dataset with the mixture's probabilities (normalised weights, times dataset lengths with `balance_by_length`), then
a uniformly random frame of it. `set_epoch(epoch)` gives a fresh draw (`VLATrainer` calls it at every epoch; call
it from your own training loop, as with a DistributedSampler). Any sampler or number of DataLoader workers therefore
sees the same stream; persistent workers keep the epoch they started with, so recreate them (the default) when the
epoch should change.

Epoch length. `len(mixture) = max_k ceil(len_k / p_k)` with p_k the probability of drawing dataset k: the number of
draws after which every dataset has been visited, in expectation, at least as many times as it has frames. Without
`balance_by_length` p_k is the normalised weight, which is StarVLA's definition.

Alignment. Samples keep the underlying dataset's keys; actions are zero-padded to `mixture.action_dim` and state to
`mixture.state_dim` (the largest over datasets), and each sample carries:
    "action_mask"     bool [T, action_dim]: False on padded dimensions and on steps past the episode end
    "state_dim_mask"  bool [state_dim]: False on padded dimensions (all False for a dataset without state)
    "embodiment"      str: the entry's statistics key
When no dataset has a state, samples carry neither "state" nor "state_dim_mask". Images keep each dataset's camera
names (rename them per dataset with `cameras: {feature: name}`); `check_camera_names(processor.camera_names)` makes
sure every dataset has each camera the model reads.

Statistics. `compute_norm_stats()` gives `{embodiment: {"action", "state", "action_mode", "num_transitions",
"num_trajectories"}}`
in the processor's format at the mixture's dimensions (padded dimensions: mode "identity", zeros, std 1), ready for
`VLAProcessor.set_norm_stats` (`for key, stats in mixture.compute_norm_stats().items(): processor.set_norm_stats(key,
stats)`); a padded feature records its own width as `embodiment_dim`, so that
`decode_actions` / `VLAPolicy.predict` return the embodiment's own action dimensions and take its own state width.
Entries that share an embodiment are merged by recomputing the statistics from their
concatenated parquet values (so quantiles are exact and every transition weighs the same); they must agree on
dimensions, normalisation modes and action mode.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..normalization import STAT_NAMES, describe_action_mode, expand_action_modes, expand_modes, is_relative
from .lerobot import LeRobotDataset, compute_union_stats, load_lerobot

DEFAULT_NORM_MODE = "q99"
_TOP_KEYS = {"seed", "balance_by_length", "datasets"}
_ENTRY_KEYS = {"path", "weight", "embodiment", "cameras", "action_mode", "state_key", "action_key", "normalization"}


@dataclass
class MixtureEntry:
    """One dataset of a mixture.

    Args:
        dataset: a map-style dataset of raw VLA samples (e.g. `load_lerobot(...)`).
        weight: relative sampling weight (> 0).
        embodiment: statistics key the samples are normalised with.
        normalization: `{"action": mode or per-dimension list, "state": ...}` (modes of `hf_vla.normalization`);
            q99 where None or missing.
    """

    dataset: Any
    weight: float
    embodiment: str
    normalization: Mapping | None = None


class VLAMixture(Dataset):
    """A weighted, seeded, cross-embodiment mixture of VLA datasets (see the module docstring)."""

    def __init__(self, datasets: Sequence[MixtureEntry], seed: int = 0, balance_by_length: bool = False):
        self.entries = list(datasets)
        if not self.entries:
            raise ValueError("VLAMixture: at least one dataset is required")
        for k, entry in enumerate(self.entries):
            _check_entry(entry, f"datasets[{k}]")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        if not isinstance(balance_by_length, (bool, np.bool_)):
            raise ValueError(f"balance_by_length: expected true or false, got {balance_by_length!r}")
        self.seed, self.balance_by_length, self.epoch = int(seed), bool(balance_by_length), 0

        self.lengths = np.array([len(entry.dataset) for entry in self.entries], dtype=np.int64)
        dims = [_feature_dims(entry.dataset) for entry in self.entries]
        self.action_dims = [d[0] for d in dims]
        self.state_dims = [d[1] for d in dims]
        horizons = sorted({d[2] for d in dims})
        if len(horizons) != 1:
            raise ValueError(f"VLAMixture: datasets have different action horizons {[d[2] for d in dims]}")
        self.action_horizon = horizons[0]
        self.action_dim, self.state_dim = max(self.action_dims), max(self.state_dims)
        self.modes = [self._entry_modes(k) for k in range(len(self.entries))]

        weights = np.array([entry.weight for entry in self.entries], dtype=np.float64)
        self.weights = weights / weights.sum()
        draw = self.weights * self.lengths if self.balance_by_length else self.weights
        self.probabilities = draw / draw.sum()
        # the small slack keeps float error (e.g. 100 / 0.5000000001) from adding a draw
        self._length = int(np.ceil(self.lengths / self.probabilities - 1e-6).max())

    def _entry_modes(self, k: int) -> tuple[list[str], list[str]]:
        entry, field = self.entries[k], f"datasets[{k}].normalization"
        if entry.normalization is not None and not isinstance(entry.normalization, Mapping):
            raise ValueError(f"{field}: expected a mapping {{action: mode(s), state: mode(s)}}, "
                             f"got {entry.normalization!r}")
        spec = dict(entry.normalization or {})
        unknown = sorted(set(spec) - {"action", "state"})
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {unknown}; expected 'action' and/or 'state'")
        return (
            expand_modes(spec.get("action", DEFAULT_NORM_MODE), self.action_dims[k], f"{field}.action"),
            expand_modes(spec.get("state", DEFAULT_NORM_MODE), self.state_dims[k], f"{field}.state"),
        )

    # ---- sampling ----
    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"set_epoch: expected a non-negative integer, got {epoch}")
        self.epoch = int(epoch)

    def draw(self, index: int) -> tuple[int, int]:
        """(dataset number, frame index) that `mixture[index]` reads at the current epoch."""
        index = int(index) + len(self) if int(index) < 0 else int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture epoch of {len(self)} samples")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self.entries), p=self.probabilities))
        return k, int(rng.integers(self.lengths[k]))

    def __getitem__(self, index: int) -> dict:
        k, frame = self.draw(index)
        return self._aligned(self.entries[k].dataset[frame], k)

    def without_images(self) -> VLAMixture:
        """The same draws without camera views (each dataset's `without_images()`, where it has one)."""
        view = copy.copy(self)
        view.entries = [dataclasses.replace(entry, dataset=entry.dataset.without_images())
                        if hasattr(entry.dataset, "without_images") else entry for entry in self.entries]  # fmt: skip
        return view

    def _aligned(self, sample: Mapping, k: int) -> dict:
        sample = dict(sample)
        actions = np.asarray(sample["actions"], dtype=np.float32)
        steps, dim = actions.shape
        valid = np.asarray(sample.get("action_mask", np.ones(steps, dtype=bool)), dtype=bool)
        sample["actions"] = np.zeros((steps, self.action_dim), dtype=np.float32)
        sample["actions"][:, :dim] = actions
        sample["action_mask"] = np.zeros((steps, self.action_dim), dtype=bool)
        sample["action_mask"][:, :dim] = valid if valid.ndim == 2 else valid[:, None]
        if self.state_dim:
            state = np.asarray(sample.get("state", np.zeros(0)), dtype=np.float32).reshape(-1)
            sample["state"] = np.zeros(self.state_dim, dtype=np.float32)
            sample["state"][: len(state)] = state
            sample["state_dim_mask"] = np.arange(self.state_dim) < len(state)
        sample["embodiment"] = self.entries[k].embodiment
        return sample

    def check_camera_names(self, camera_names: Sequence[str]) -> None:
        """Every dataset yields a view for each of `camera_names` (the processor's cameras, in any order; extra views
        are ignored). A dataset without one would otherwise fail only when one of its frames is drawn into a batch,
        possibly far into training."""
        expected = list(camera_names)
        for k, entry in enumerate(self.entries):
            names = _camera_names(entry.dataset)
            missing = [name for name in expected if name not in names]
            if missing:
                raise ValueError(f"datasets[{k}] ({entry.embodiment!r}).cameras: expected views named {expected}, got "
                                 f"{names} (missing {missing}); name its camera features after them in the mixture "
                                 "(cameras: {feature: name})")

    # ---- statistics ----
    @property
    def embodiments(self) -> list[str]:
        return list(dict.fromkeys(entry.embodiment for entry in self.entries))

    def compute_norm_stats(self) -> dict:
        """Per-embodiment statistics at the mixture's dimensions (see the module docstring)."""
        stats = {}
        for key in self.embodiments:
            members = [k for k, entry in enumerate(self.entries) if entry.embodiment == key]
            group = self._group_stats(key, members)
            own = len(group["action"]["mode"])
            group["action"] = _pad_feature_stats(group["action"], self.action_dim)
            mode = group.get("action_mode", "abs")
            if is_relative(mode) and own < self.action_dim:  # padded dimensions are absolute (identity, zero)
                group["action_mode"] = expand_action_modes(mode, own) + ["abs"] * (self.action_dim - own)
            if self.state_dim:
                group["state"] = _pad_feature_stats(group.get("state"), self.state_dim)
            else:
                group.pop("state", None)
            stats[key] = group
        return stats

    def _group_stats(self, key: str, members: list[int]) -> dict:
        first = members[0]
        action_modes, state_modes = self.modes[first]
        for k in members[1:]:
            if (self.action_dims[k], self.state_dims[k]) != (self.action_dims[first], self.state_dims[first]):
                raise ValueError(f"embodiment {key!r}: datasets[{first}] and datasets[{k}] have different dimensions "
                                 f"(action {self.action_dims[first]} vs {self.action_dims[k]}, state "
                                 f"{self.state_dims[first]} vs {self.state_dims[k]})")
            if self.modes[k] != self.modes[first]:
                raise ValueError(f"embodiment {key!r}: datasets[{first}] and datasets[{k}] have different "
                                 "normalisation modes")
            kinds = [getattr(self.entries[i].dataset, "action_mode", "abs") for i in (first, k)]
            if kinds[0] != kinds[1]:  # one unnorm_key cannot map both absolute and delta actions back
                raise ValueError(f"embodiment {key!r}: datasets[{first}] and datasets[{k}] have different action "
                                 f"modes ({describe_action_mode(kinds[0])} vs {describe_action_mode(kinds[1])})")
        state_mode = state_modes or DEFAULT_NORM_MODE
        if len(members) == 1:
            dataset = self.entries[first].dataset
            if not hasattr(dataset, "compute_stats"):
                raise TypeError(f"datasets[{first}] ({type(dataset).__name__}) has no compute_stats method")
            return dict(dataset.compute_stats(action_mode=action_modes, state_mode=state_mode))

        datasets = [self.entries[k].dataset for k in members]
        for k, dataset in zip(members, datasets):
            if not isinstance(dataset, LeRobotDataset):
                raise TypeError(f"embodiment {key!r}: merging statistics needs LeRobot datasets, datasets[{k}] is a "
                                f"{type(dataset).__name__}; give it its own embodiment key")
        return compute_union_stats(datasets, action_mode=action_modes, state_mode=state_mode)

    def __repr__(self) -> str:
        rows = [f"  [{k}] {entry.embodiment!r} p={p:.3f} frames={n} action_dim={a} state_dim={s}"
                for k, (entry, p, n, a, s) in enumerate(zip(self.entries, self.probabilities, self.lengths,
                                                             self.action_dims, self.state_dims))]
        return (f"VLAMixture(epoch length {len(self)}, seed={self.seed}, epoch={self.epoch}, "
                f"action_dim={self.action_dim}, state_dim={self.state_dim}, action_horizon={self.action_horizon})\n"
                + "\n".join(rows))


def load_mixture(config, action_horizon: int, **load_kwargs) -> VLAMixture:
    """A mixture of LeRobot datasets from a YAML file or an equivalent dict (schema in the module docstring).

    `load_kwargs` go to every `load_lerobot` call (e.g. `decoder=`); an entry's own keys take precedence. Relative
    paths in a dict resolve against the current directory.
    """
    if isinstance(config, Mapping):
        spec, base = dict(config), Path.cwd()
    else:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"mixture file not found: {path}")
        spec, base = yaml.safe_load(path.read_text(encoding="utf-8")), path.parent
    if not isinstance(spec, Mapping) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
        raise ValueError("mixture: expected a mapping with a non-empty 'datasets' list")
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"mixture: unknown key(s) {unknown}; expected {sorted(_TOP_KEYS)}")
    entries = [_load_entry(item, f"datasets[{k}]", base, action_horizon, load_kwargs)
               for k, item in enumerate(spec["datasets"])]
    return VLAMixture(entries, seed=spec.get("seed", 0), balance_by_length=spec.get("balance_by_length", False))


def _load_entry(item, field: str, base: Path, action_horizon: int, load_kwargs: dict) -> MixtureEntry:
    if not isinstance(item, Mapping) or "path" not in item:
        raise ValueError(f"{field}: expected a mapping with a 'path', got {item!r}")
    unknown = sorted(set(item) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {unknown}; expected {sorted(_ENTRY_KEYS)}")
    root = Path(item["path"]).expanduser()
    root = root if root.is_absolute() else base / root
    kwargs = dict(load_kwargs)
    cameras = item.get("cameras")
    if isinstance(cameras, Mapping):
        unnamed = {key: name for key, name in cameras.items() if not isinstance(name, str) or not name}
        if unnamed:  # `{observation.images.front: }` in YAML names the view None
            raise ValueError(f"{field}.cameras: expected a name (a non-empty string) for each camera key, got "
                             f"{unnamed}")
        kwargs["cameras"], kwargs["camera_rename"] = list(cameras), dict(cameras)
    elif isinstance(cameras, str):
        kwargs["cameras"] = [cameras]
    elif isinstance(cameras, list):
        kwargs["cameras"] = cameras
    elif cameras is not None:
        raise ValueError(f"{field}.cameras: expected a camera key, a list of them or a mapping key -> name, "
                         f"got {cameras!r}")
    kwargs.update({key: item[key] for key in ("action_mode", "state_key", "action_key") if key in item})
    try:
        dataset = load_lerobot(root, action_horizon=action_horizon, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{field} ({root}): {err}") from err
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):  # checked for sign and finiteness later
        raise ValueError(f"{field}.weight: expected a positive number, got {weight!r}")
    embodiment = item.get("embodiment")
    embodiment = root.name if embodiment is None else embodiment  # checked to be a non-empty string later
    return MixtureEntry(dataset, float(weight), embodiment, item.get("normalization"))


def _check_entry(entry, field: str) -> None:
    if not isinstance(entry, MixtureEntry):
        raise TypeError(f"{field}: expected a MixtureEntry, got {type(entry).__name__}")
    if not (isinstance(entry.weight, numbers.Real) and math.isfinite(entry.weight) and entry.weight > 0):
        raise ValueError(f"{field}.weight: expected a positive number, got {entry.weight!r}")
    if not isinstance(entry.embodiment, str) or not entry.embodiment:
        raise ValueError(f"{field}.embodiment: expected a non-empty string, got {entry.embodiment!r}")
    if len(entry.dataset) == 0:
        raise ValueError(f"{field}: the dataset is empty")


def _feature_dims(dataset) -> tuple[int, int, int]:
    """(action_dim, state_dim, action_horizon): from LeRobot metadata, else from the first sample."""
    if isinstance(dataset, LeRobotDataset):
        state_dim = int(np.prod(dataset.features[dataset.state_key]["shape"])) if dataset.state_key else 0
        return int(np.prod(dataset.features[dataset.action_key]["shape"])), state_dim, dataset.action_horizon
    sample = dataset[0]
    actions = np.asarray(sample["actions"])
    state_dim = int(np.asarray(sample["state"]).size) if "state" in sample else 0
    return int(actions.shape[-1]), state_dim, int(actions.shape[0])


def _camera_names(dataset) -> list[str]:
    """The image names a dataset's samples carry: from LeRobot metadata, else from the first sample."""
    names = getattr(dataset, "camera_names", None)
    return list(names) if names is not None else list(dataset[0].get("images", {}))


def _pad_feature_stats(stats: Mapping | None, dim: int) -> dict:
    """Extends one feature's statistics to `dim` dimensions; the added ones pass through unchanged (identity)."""
    have = 0 if stats is None else len(stats["mode"])
    padded = {name: [float(v) for v in (stats[name] if stats else [])] + [1.0 if name == "std" else 0.0] * (dim - have)
              for name in STAT_NAMES}
    padded["mode"] = list(stats["mode"] if stats else []) + ["identity"] * (dim - have)
    if have < dim:  # the processor decodes and takes state at the embodiment's own width
        padded["embodiment_dim"] = have
    return padded


if __name__ == "__main__":
    from ..testing import scratch_dir
    from .lerobot_writer import synthetic_episodes, write_lerobot_dataset

    root = scratch_dir("mixture_demo_")
    write_lerobot_dataset(root / "arm7", synthetic_episodes(3, 10, size=16, state_dim=7, action_dim=7,
                                                            cameras=("front",)), fps=10, video=False)
    write_lerobot_dataset(root / "arm4", synthetic_episodes(2, 8, size=16, state_dim=3, action_dim=4,
                                                            cameras=("top",), seed=1), fps=10, video=False)
    mixture = load_mixture({"seed": 0, "datasets": [
        {"path": str(root / "arm7"), "weight": 3.0, "embodiment": "arm7",
         "cameras": {"observation.images.front": "primary"}, "normalization": {"action": ["q99"] * 6 + ["binary"]}},
        {"path": str(root / "arm4"), "weight": 1.0, "embodiment": "arm4",
         "cameras": {"observation.images.top": "primary"}},
    ]}, action_horizon=4)
    print(mixture)
    counts = np.bincount([mixture.draw(i)[0] for i in range(len(mixture))], minlength=2)
    expected = (mixture.probabilities * len(mixture)).tolist()
    print("draws per dataset in epoch 0:", counts.tolist(), "expected:", expected)
    for k in range(2):
        sample = mixture[next(i for i in range(len(mixture)) if mixture.draw(i)[0] == k)]
        print(f"{sample['embodiment']}: actions {list(sample['actions'].shape)}, images {list(sample['images'])}, "
              f"action_mask[0] {sample['action_mask'][0].astype(int)}, "
              f"state_dim_mask {sample['state_dim_mask'].astype(int)}")
    for key, stats in mixture.compute_norm_stats().items():
        print(f"{key}: action modes {stats['action']['mode']}, {stats['num_transitions']} transitions")
