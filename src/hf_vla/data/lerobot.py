"""Reads LeRobot-format datasets (v3.0, and v2.1/v2.0) from disk, without the `lerobot` package.

`load_lerobot(root, action_horizon=T)` gives a map-style dataset (torch `Dataset`) with one raw sample per frame:

    {"images": {camera: uint8 [H, W, 3]}, "instruction": str, "state": float32 [S] (when the dataset has one),
     "actions": float32 [T, D], "action_mask": bool [T], "episode_index": int, "frame_index": int}

`actions` holds the frame's action and the next T-1 of the same episode. Steps past the episode end are padded by
repeating the last valid action (in raw space, before the action_mode transform, as StarVLA's GR00T-derived loader
does) and are False in `action_mask`. action_mode: "abs" raw; "rel" a_t - s_0; "delta" a_0 - s_0, then a_t - a_{t-1}
(padded steps are therefore zero deltas). One mode per dimension is taken too, e.g. `["rel"] * 6 + ["abs"]` for
openpi's delta actions (its `DeltaActions` subtracts the first state from every step) with the gripper left absolute.

All numeric columns are loaded once into numpy; images come from the videos through a pluggable decoder
(`hf_vla.data.video`) or from PNG bytes embedded in the parquet (image-mode datasets).
"""

from __future__ import annotations

import copy
import io
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from ..normalization import (
    ACTION_MODES, apply_action_mode, compact_action_mode, describe_action_mode, expand_action_modes, is_relative,
    relative_state_width
)
from ..normalization import compute_stats as compute_feature_stats
from .video import VideoDecodeError, as_decoder

CAMERA_DTYPES = ("video", "image")
DEFAULT_STATE_KEY = "observation.state"
_IMAGE_FILES_CACHED = 4  # image-mode parquet files whose image columns stay in memory per process


def load_lerobot(
    root,
    action_horizon: int = 1,
    cameras: Sequence[str] | None = None,
    state_key: str | None = DEFAULT_STATE_KEY,
    action_key: str = "action",
    action_mode: str | Sequence[str] = "abs",
    camera_rename: Mapping[str, str] | None = None,
    decoder=None,
) -> LeRobotDataset:
    """Opens the LeRobot dataset at `root` (a local directory); see `LeRobotDataset`."""
    return LeRobotDataset(root, action_horizon, cameras, state_key, action_key, action_mode, camera_rename, decoder)


class LeRobotDataset(Dataset):
    """One sample per frame of a local LeRobot dataset (see the module docstring for the sample layout).

    Args:
        root: dataset directory (holds meta/info.json).
        action_horizon: T, the number of actions per sample.
        cameras: camera feature keys to return, in this order; all video/image features when None.
        state_key: the state feature; None for none. The default, "observation.state", may be absent (samples then
            have no "state"); any other name must be a feature of the dataset.
        action_key: the action feature.
        action_mode: "abs", "delta" or "rel", or one of them per action dimension: openpi's delta actions keep the
            gripper absolute, `["rel"] * 6 + ["abs"]`. Action dimension i is relative to state dimension i, which must
            exist (a wider state's extra values are not read).
        camera_rename: {feature key: output name} for the "images" dict.
        decoder: a video decoder (object with `decode(path, timestamps)` or such a callable); PyAV when None.
    """

    def __init__(
        self,
        root,
        action_horizon: int = 1,
        cameras: Sequence[str] | None = None,
        state_key: str | None = DEFAULT_STATE_KEY,
        action_key: str = "action",
        action_mode: str | Sequence[str] = "abs",
        camera_rename: Mapping[str, str] | None = None,
        decoder=None,
    ):
        self.root = Path(root)
        self.info = _read_json(self.root / "meta" / "info.json")
        missing = [key for key in ("fps", "features", "data_path") if key not in self.info]
        if missing:
            raise ValueError(f"{self.root / 'meta' / 'info.json'}: missing key(s) {missing}")
        self.version = str(self.info.get("codebase_version", ""))
        self.fps = self.info["fps"]
        self.features: dict[str, dict] = self.info["features"]
        if any(f.get("dtype") == "video" for f in self.features.values()) and not self.info.get("video_path"):
            raise ValueError(f"{self.root / 'meta' / 'info.json'}: video features but no 'video_path' template")
        if isinstance(action_horizon, bool) or not isinstance(action_horizon, (int, np.integer)) or action_horizon < 1:
            raise ValueError(f"action_horizon: expected a positive integer, got {action_horizon!r}")
        if isinstance(action_mode, str):  # a list is checked against the action width once the columns are read
            expand_action_modes(action_mode, 1)
        self.action_horizon, self.action_mode = action_horizon, action_mode
        self.action_key = action_key
        if action_key not in self.features:
            raise ValueError(f"action_key {action_key!r} is not a feature of {self.root}; "
                             f"available: {self._numeric_keys()}")
        if state_key not in (None, DEFAULT_STATE_KEY) and state_key not in self.features:
            raise ValueError(f"state_key {state_key!r} is not a feature of {self.root}; available: "
                             f"{self._numeric_keys()} (None for no state)")
        self.state_key = state_key if state_key in self.features else None
        self.cameras = self._select_cameras([cameras] if isinstance(cameras, str) else cameras)
        self.camera_names = self._rename_cameras(camera_rename or {})
        self.decoder = as_decoder(decoder)

        if self.version == "v3.0":
            self.tasks, self.episodes = _read_v3_meta(self.root, self.info)
        elif self.version.startswith("v2"):
            self.tasks, self.episodes = _read_v2_meta(self.root, self.info)
        else:
            raise ValueError(f"{self.root / 'meta' / 'info.json'}: unsupported codebase_version {self.version!r} "
                             "(expected v3.0, v2.1 or v2.0)")
        self._load_columns()
        self._check_action_mode()
        self._check_files()
        self._image_tables: OrderedDict[int, dict] = OrderedDict()

    # ---- setup ----
    def _check_files(self):
        """Task indices that name a task and video files that exist, found now rather than mid-training (a partly
        downloaded dataset fails at the first sample of a missing file otherwise)."""
        unknown = sorted(set(np.unique(self._task_index).tolist()) - set(self.tasks))
        if unknown:
            raise ValueError(f"{self.root}: task_index {unknown[:10]} of the data files not in the task list "
                             f"(known: {sorted(self.tasks)[:10]})")
        videos = {path for episode in self.episodes.values() for key, (path, _) in episode["videos"].items()
                  if key in self.cameras}  # fmt: skip
        missing = sorted(path for path in videos if not (self.root / path).is_file())
        if missing:
            raise FileNotFoundError(f"{len(missing)} video file(s) of {self.root} missing, e.g. "
                                    f"{[str(self.root / path) for path in missing[:3]]}")

    def _numeric_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] not in CAMERA_DTYPES + ("string",)]

    def _select_cameras(self, cameras) -> list[str]:
        # LeRobot marks depth streams (12/16-bit values) in the feature's info; decoded as RGB they would be noise
        depth = [k for k, f in self.features.items() if _is_depth_map(f)]
        available = [k for k, f in self.features.items() if f["dtype"] in CAMERA_DTYPES and k not in depth]
        if cameras is None:
            return available
        asked_depth = [c for c in cameras if c in depth]
        if asked_depth:
            raise ValueError(f"depth camera(s) {asked_depth} in {self.root}: depth maps are not supported; RGB "
                             f"cameras: {available}")
        unknown = [c for c in cameras if c not in available]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown} in {self.root}; available cameras: {available}")
        return list(cameras)

    def _rename_cameras(self, rename: Mapping[str, str]) -> list[str]:
        unknown = [k for k in rename if k not in self.cameras]
        if unknown:
            raise ValueError(f"camera_rename: {unknown} not among the selected cameras {self.cameras}")
        unnamed = {k: v for k, v in rename.items() if not isinstance(v, str) or not v}
        if unnamed:  # e.g. a YAML `{observation.images.front: }`, which would name the view None
            raise ValueError(f"camera_rename: expected a non-empty string name for each camera, got {unnamed}")
        names = [rename.get(k, k) for k in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera_rename: output names collide: {names}")
        return names

    def _check_action_mode(self):
        action_dim = self._actions.shape[1]
        self.action_mode = compact_action_mode(expand_action_modes(self.action_mode, action_dim))
        if not is_relative(self.action_mode):
            return
        mode = describe_action_mode(self.action_mode)
        if self.state_key is None:
            raise ValueError(f"action_mode {mode} needs a state, but {self.root} has no state feature (action "
                             f"{self.action_key!r} dim {action_dim}, state dim 0)")
        state_dim, needed = self._states.shape[1], relative_state_width(self.action_mode, action_dim)
        if state_dim < needed:  # action dimension i is relative to state dimension i
            raise ValueError(f"action_mode {mode} needs a state value for each relative action dimension (0.."
                             f"{needed - 1}): state {self.state_key!r} has dim {state_dim}, action {self.action_key!r} "
                             f"has dim {action_dim}")

    def _load_columns(self):
        """Reads every numeric column needed from the data parquet files into flat per-row numpy arrays."""
        files = list(dict.fromkeys(ep["data_file"] for ep in self.episodes.values()))
        wanted = ["episode_index", "frame_index", "timestamp", "task_index", self.action_key]
        if self.state_key:
            wanted.append(self.state_key)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in wanted}
        file_ids, rows_in_file = [], []
        for file_id, relative in enumerate(files):
            path = self.root / relative
            table = _read_parquet(path, wanted)
            for key in wanted:
                shape = self.features[key].get("shape") if key in (self.action_key, self.state_key) else None
                width = None if shape is None else int(np.prod(shape))
                parts[key].append(_column_to_numpy(table.column(key), path, key, width))
            file_ids.append(np.full(table.num_rows, file_id, dtype=np.int32))
            rows_in_file.append(np.arange(table.num_rows, dtype=np.int64))
        columns = {k: np.concatenate(v) for k, v in parts.items()}
        self._data_files = files
        self._row_file = np.concatenate(file_ids)
        self._row_in_file = np.concatenate(rows_in_file)
        self._episode_index = columns["episode_index"].reshape(-1).astype(np.int64)
        self._frame_index = columns["frame_index"].reshape(-1).astype(np.int64)
        self._timestamp = columns["timestamp"].reshape(-1).astype(np.float64)
        self._task_index = columns["task_index"].reshape(-1).astype(np.int64)
        with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, refused just below
            self._actions = columns[self.action_key].reshape(len(self._episode_index), -1).astype(np.float32)
            self._states = None
            if self.state_key:
                self._states = columns[self.state_key].reshape(len(self._episode_index), -1).astype(np.float32)
        for key, values in ((self.action_key, self._actions), (self.state_key, self._states)):
            if values is not None and not np.isfinite(values).all():
                self._refuse_non_finite(key, columns[key].reshape(len(values), -1), values)
        self._episode_bounds()

    def _refuse_non_finite(self, key: str, raw: np.ndarray, values: np.ndarray):
        row, dim = np.argwhere(~np.isfinite(values))[0]
        value = raw[row, dim]
        got = f"{value} (beyond float32's range)" if np.isfinite(value) else str(value)
        path = self.root / self._data_files[self._row_file[row]]
        raise ValueError(f"{path}: column {key!r}: expected finite values, got {got} in dimension {dim} at episode "
                         f"{self._episode_index[row]} frame {self._frame_index[row]}")

    def _episode_bounds(self):
        """Per row: the first row of its episode and one past its last (rows of an episode are contiguous, in frame
        order)."""
        n = len(self._episode_index)
        starts = np.flatnonzero(np.diff(self._episode_index, prepend=-1) != 0)
        ends = np.append(starts[1:], n)
        seen = self._episode_index[starts]
        if len(set(seen.tolist())) != len(seen):
            raise ValueError(f"{self.root}: an episode's rows are not contiguous in the data files")
        for episode, start, end in zip(seen.tolist(), starts, ends):
            meta = self.episodes.get(episode)
            if meta is None:
                raise ValueError(f"{self.root / self._data_files[self._row_file[start]]}: rows of episode {episode} "
                                 "that the episode metadata does not list")
            if meta["length"] != end - start:
                raise ValueError(f"{self.root / meta['data_file']}: episode {episode} has {end - start} rows, "
                                 f"metadata says {meta['length']}")
        missing = sorted(set(self.episodes) - set(seen.tolist()))
        if missing:
            raise ValueError(f"{self.root}: episode(s) {missing[:10]} listed in the episode metadata have no rows in "
                             "the data files")
        lengths = ends - starts
        self._row_start = np.repeat(starts, lengths)
        self._row_end = np.repeat(ends, lengths)
        self.num_episodes = len(starts)
        # a sample's action chunk is the rows after its own, so an episode's rows must be consecutive frames in order
        # (from 0 in LeRobot's own datasets; a converted one may start later)
        first = self._frame_index[self._row_start]
        misplaced = np.flatnonzero(self._frame_index != first + np.arange(n) - self._row_start)
        if len(misplaced):
            row = misplaced[0]
            start, end = self._row_start[row], self._row_end[row]
            raise ValueError(f"{self.root / self._data_files[self._row_file[row]]}: episode "
                             f"{self._episode_index[row]}: frame_index: expected consecutive frames "
                             f"{first[row]}..{first[row] + end - start - 1} in row order, got {self._frame_index[row]} "
                             f"at the episode's row {row - start}")

    # ---- samples ----
    def __len__(self) -> int:
        return len(self._episode_index)

    def __getitem__(self, index: int) -> dict:
        row = int(index) + len(self) if int(index) < 0 else int(index)
        if not 0 <= row < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} frames")
        steps = row + np.arange(self.action_horizon)
        end = self._row_end[row]
        mask = steps < end
        actions = self._actions[np.minimum(steps, end - 1)]
        sample = {
            "images": self._images(row),
            "instruction": self.tasks[int(self._task_index[row])],
        }
        if self._states is not None:
            sample["state"] = self._states[row].copy()
            actions = apply_action_mode(actions, self._states[row], self.action_mode)
        sample["actions"] = np.ascontiguousarray(actions, dtype=np.float32)
        sample["action_mask"] = mask
        sample["episode_index"] = int(self._episode_index[row])
        sample["frame_index"] = int(self._frame_index[row])
        return sample

    def _images(self, row: int) -> dict[str, np.ndarray]:
        images = {}
        episode = self.episodes[int(self._episode_index[row])]
        for key, name in zip(self.cameras, self.camera_names):
            if self.features[key]["dtype"] == "image":
                images[name] = self._embedded_image(row, key)
                continue
            path, offset = episode["videos"][key]
            try:
                frames = self.decoder.decode(self.root / path, [offset + self._timestamp[row]])
            except VideoDecodeError as err:  # a v3 file holds many episodes: say which sample asked
                where = (f"camera {key!r} of episode {self._episode_index[row]} frame {self._frame_index[row]}, "
                         f"whose episode starts {offset:.4f}s into the file")
                raise VideoDecodeError(f"{err} ({where})") from err
            images[name] = np.asarray(frames[0])
        return images

    def _embedded_image(self, row: int, key: str) -> np.ndarray:
        from PIL import Image

        file_id = int(self._row_file[row])
        tables = self._image_tables.get(file_id)
        if tables is None:
            keys = [k for k in self.cameras if self.features[k]["dtype"] == "image"]
            tables = _read_parquet(self.root / self._data_files[file_id], keys)
            self._image_tables[file_id] = tables
            while len(self._image_tables) > _IMAGE_FILES_CACHED:
                self._image_tables.popitem(last=False)
        cell = tables.column(key)[int(self._row_in_file[row])].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if data is None:  # image stored as a path next to the dataset instead of embedded bytes
            return np.asarray(Image.open(self.root / cell["path"]).convert("RGB"))
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_image_tables"] = OrderedDict()
        return state

    def without_images(self) -> LeRobotDataset:
        """The same samples without camera views, sharing the loaded columns: actions and states with no video
        decoded (e.g. to fit an action tokenizer)."""
        view = copy.copy(self)
        view.cameras, view.camera_names, view._image_tables = [], [], OrderedDict()
        return view

    # ---- statistics ----
    def compute_stats(self, action_mode="q99", state_mode="q99") -> dict:
        """Normalisation statistics in the processor's format, from the parquet columns (no video decoding).

        `action_mode` / `state_mode` are normalisation modes (hf_vla.normalization.NORM_MODES, one or one per
        dimension), not the dataset's action_mode. Action statistics describe the actions as samples return them:
        raw actions for "abs"; for "delta"/"rel" every valid (unpadded) step of every frame's chunk.
        """
        actions = self._action_values_for_stats()
        stats = {"action": compute_feature_stats(actions, action_mode, "compute_stats.action_mode")}
        if self._states is not None:
            stats["state"] = compute_feature_stats(self._states, state_mode, "compute_stats.state_mode")
        stats["num_transitions"] = len(self)
        stats["num_trajectories"] = self.num_episodes
        stats["action_mode"] = self.action_mode  # how decoded actions become absolute again (with the state)
        return stats

    def _action_values_for_stats(self, block: int = 65536) -> np.ndarray:
        if not is_relative(self.action_mode):
            return self._actions
        values = []
        for first in range(0, len(self), block):
            rows = np.arange(first, min(first + block, len(self)))
            steps = rows[:, None] + np.arange(self.action_horizon)
            ends = self._row_end[rows][:, None]
            chunks = self._actions[np.minimum(steps, ends - 1)]
            transformed = apply_action_mode(chunks, self._states[rows], self.action_mode)
            values.append(transformed[steps < ends])
        return np.concatenate(values)

    def __repr__(self) -> str:
        state_dim = 0 if self._states is None else self._states.shape[1]
        return (f"LeRobotDataset({self.root}, {self.version}, {self.num_episodes} episodes, {len(self)} frames, "
                f"fps={self.fps}, cameras={dict(zip(self.cameras, self.camera_names))}, state_dim={state_dim}, "
                f"action_dim={self._actions.shape[1]}, action_horizon={self.action_horizon}, "
                f"action_mode={self.action_mode!r})")


def compute_union_stats(datasets: Sequence[LeRobotDataset], action_mode="q99", state_mode="q99") -> dict:
    """`LeRobotDataset.compute_stats` of several datasets of one embodiment taken together: the exact statistics of
    their union (the same values concatenated), so that one statistics key serves all of them."""
    if len(datasets) == 1:
        return datasets[0].compute_stats(action_mode=action_mode, state_mode=state_mode)
    widths = {str(d.root): (d._actions.shape[1], 0 if d._states is None else d._states.shape[1]) for d in datasets}
    if len(set(widths.values())) > 1:
        raise ValueError(f"datasets of one statistics key have different (action, state) widths {widths}; give them "
                         "keys of their own")
    modes = [d.action_mode for d in datasets]
    if any(mode != modes[0] for mode in modes):  # one key cannot map both absolute and relative actions back
        described = dict.fromkeys(describe_action_mode(mode) for mode in modes)
        raise ValueError(f"datasets of one statistics key have different action modes ({' vs '.join(described)})")
    stats = {"action": compute_feature_stats(np.concatenate([d._action_values_for_stats() for d in datasets]),
                                             action_mode, "compute_stats.action_mode")}  # fmt: skip
    if datasets[0]._states is not None:
        stats["state"] = compute_feature_stats(np.concatenate([d._states for d in datasets]), state_mode,
                                               "compute_stats.state_mode")
    stats["num_transitions"] = int(sum(len(d) for d in datasets))
    stats["num_trajectories"] = int(sum(d.num_episodes for d in datasets))
    stats["action_mode"] = modes[0]
    return stats


# ---- metadata readers ----
def _read_v3_meta(root: Path, info: dict) -> tuple[dict[int, str], dict[int, dict]]:
    tasks_table = _read_parquet(root / "meta" / "tasks.parquet")
    if "task_index" not in tasks_table.column_names:
        raise ValueError(f"{root / 'meta' / 'tasks.parquet'}: missing column 'task_index'; has {tasks_table.column_names}")
    # lerobot 0.6 names the task column "task"; 0.4 left it an unnamed pandas index
    task_column = "task" if "task" in tasks_table.column_names else "__index_level_0__"
    tasks = dict(zip(tasks_table.column("task_index").to_pylist(), tasks_table.column(task_column).to_pylist()))

    episode_files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not episode_files:
        raise FileNotFoundError(f"no episode metadata under {root / 'meta' / 'episodes'}")
    episodes = {}
    video_keys = [key for key, feature in info["features"].items() if feature["dtype"] == "video"]
    required = ["episode_index", "length", "data/chunk_index", "data/file_index",
                *(f"videos/{key}/{part}" for key in video_keys for part in ("chunk_index", "file_index", "from_timestamp"))]
    for path in episode_files:
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [column for column in required if column not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        table = _read_parquet(path, [n for n in names if not n.startswith("stats/")])
        for row in table.to_pylist():
            data_file = info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                 file_index=row["data/file_index"])
            videos = {}
            for key, feature in info["features"].items():
                if feature["dtype"] == "video":
                    video_file = info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                           file_index=row[f"videos/{key}/file_index"])
                    videos[key] = (video_file, float(row[f"videos/{key}/from_timestamp"]))
            episodes[row["episode_index"]] = {"length": row["length"], "data_file": data_file, "videos": videos}
    return tasks, dict(sorted(episodes.items()))


def _read_v2_meta(root: Path, info: dict) -> tuple[dict[int, str], dict[int, dict]]:
    tasks = {row["task_index"]: row["task"] for row in _read_jsonl(root / "meta" / "tasks.jsonl")}
    chunks_size = info.get("chunks_size", 1000)
    episodes = {}
    for row in _read_jsonl(root / "meta" / "episodes.jsonl"):
        index = row["episode_index"]
        chunk = index // chunks_size
        videos = {
            key: (info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=index), 0.0)
            for key, feature in info["features"].items()
            if feature["dtype"] == "video"
        }
        data_file = info["data_path"].format(episode_chunk=chunk, episode_index=index)
        episodes[index] = {"length": row["length"], "data_file": data_file, "videos": videos}
    return tasks, dict(sorted(episodes.items()))


# ---- file helpers ----
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"LeRobot metadata file not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"LeRobot metadata file not found: {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"LeRobot parquet file not found: {path}")
    try:
        available = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns or [] if c not in available]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {available}")
        return pq.read_table(path, columns=columns)
    except pa.ArrowException as err:
        raise ValueError(f"cannot read parquet file {path}: {err}") from err


def _is_depth_map(feature: Mapping) -> bool:
    info = feature.get("info") or {}
    return bool(info.get("is_depth_map") or info.get("video.is_depth_map"))


def _is_list(array: pa.Array) -> bool:
    kind = array.type
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _column_to_numpy(column: pa.ChunkedArray, path: Path, key: str, width: int | None = None) -> np.ndarray:
    """Scalar column → [N]; list column → [N, D] (nested lists, as 2-D features are stored, flattened per row).
    `width`, when given, is the D that info.json's shape declares for the feature."""
    column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{path}: column {key!r} has null rows")
    if not _is_list(column):
        return column.to_numpy(zero_copy_only=False)
    rows, flat = len(column), column
    while _is_list(flat):  # every level must split evenly, or values would move between rows
        lengths = pc.list_value_length(flat)
        if len(lengths) and pc.min(lengths).as_py() != pc.max(lengths).as_py():  # in Arrow, not a Python list per row
            found = sorted(set(pc.unique(lengths).to_pylist()))
            raise ValueError(f"{path}: column {key!r} has rows of different lengths {found}")
        flat = flat.flatten()
        if flat.null_count:
            raise ValueError(f"{path}: column {key!r} has null values")
    got = len(flat) // rows if rows else width
    if width is not None and got != width:
        raise ValueError(f"{path}: column {key!r} has rows of {got} values, info.json's shape says {width}")
    return flat.to_numpy(zero_copy_only=False).reshape(rows, -1)


def _summary(dataset: LeRobotDataset, index: int = 0) -> str:
    sample = dataset[index]
    lines = [repr(dataset), f"sample {index}:"]
    for key, value in sample.items():
        if key == "images":
            for name, image in value.items():
                lines.append(f"  images[{name!r}]: {image.dtype} {list(image.shape)} mean={image.mean():.1f}")
        elif isinstance(value, np.ndarray):
            lines.append(f"  {key}: {value.dtype} {list(value.shape)}")
        else:
            lines.append(f"  {key}: {value!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    import tempfile

    parser = argparse.ArgumentParser(description="Print a summary of a local LeRobot dataset and one sample.")
    parser.add_argument("root", nargs="?", help="dataset directory (default: a synthetic one in a temporary folder)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--action-horizon", type=int, default=4)
    parser.add_argument("--action-mode", default="abs", help=f"one of {list(ACTION_MODES)}, or one per action "
                        "dimension comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.root is None:
            from .lerobot_writer import synthetic_episodes, write_lerobot_dataset

            args.root = write_lerobot_dataset(Path(scratch) / "synthetic", synthetic_episodes(), fps=10)
        mode = [m.strip() for m in args.action_mode.split(",")]
        mode = mode[0] if len(mode) == 1 else mode
        print(_summary(load_lerobot(args.root, action_horizon=args.action_horizon, action_mode=mode),
                       args.index))
