"""A small LeRobot-format dataset writer (v3.0 by default, v2.1 on request), without the `lerobot` package.

Meant for test fixtures and generated demonstrations. The output follows the layout lerobot's own writers produce
(file names, info.json keys, column names and Arrow types, as read off datasets written by lerobot 0.6.1 / 0.4.4):

    v3.0: meta/info.json, meta/stats.json, meta/tasks.parquet, meta/episodes/chunk-000/file-000.parquet,
          data/chunk-XXX/file-XXX.parquet, videos/<key>/chunk-XXX/file-XXX.mp4 (several episodes per file, up to
          data_files_size_in_mb / video_files_size_in_mb; chunks_size files per chunk)
    v2.1: meta/info.json, meta/stats.json, meta/tasks.jsonl, meta/episodes.jsonl, meta/episodes_stats.jsonl,
          data/chunk-XXX/episode_XXXXXX.parquet, videos/chunk-XXX/<key>/episode_XXXXXX.mp4

Usage:

    write_lerobot_dataset(root, [{"task": "open the drawer",
                                  "frames": {"observation.images.front": uint8 [N, H, W, 3],
                                             "observation.state": float32 [N, S], "action": float32 [N, D]}}],
                          fps=10, robot_type="sim_panda")

or stream with `LeRobotWriter(root, fps)`: `add_frame(frame, task)` … `save_episode()` (or `add_episode(frames,
task)`), then `finalize()`. Camera arrays (uint8 [N, H, W, 3]) become videos (`video=True`, h264 via libx264 or
AV1 via libsvtav1) or PNG images embedded in the parquet (`video=False`); other arrays become float32/int64 columns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNKS_SIZE = 1000
DATA_FILES_SIZE_IN_MB = 100  # lerobot's defaults: a v3 file takes episodes until the next one would pass these
VIDEO_FILES_SIZE_IN_MB = 200
DEFAULT_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
STAT_QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
IMAGE_STATS_MAX_FRAMES = 32
# (ffmpeg encoder, name stored in info.json, encoder options beyond g/crf, default crf)
CODECS = {  # name: (encoder, info.json codec, encoder options, default crf, highest crf)
    "h264": ("libx264", "h264", {}, 23, 51),
    "av1": ("libsvtav1", "av1", {"preset": "12"}, 30, 63),
}
CODEC_ALIASES = {"libx264": "h264", "libsvtav1": "av1"}
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def write_lerobot_dataset(root, episodes: Iterable[Mapping], fps: int, **writer_kwargs) -> Path:
    """Writes `episodes` (dicts with "task" and "frames") as a LeRobot dataset at `root`; returns `root`."""
    writer = LeRobotWriter(root, fps, **writer_kwargs)
    for episode in episodes:
        writer.add_episode(episode["frames"], episode["task"])
    writer.finalize()
    return writer.root


class LeRobotWriter:
    """Streaming writer; see the module docstring. Episodes are appended in order; `finalize()` writes the metadata.

    Args:
        root: output directory (created; must not already hold a dataset).
        fps: frames per second of every episode.
        robot_type: stored in info.json.
        version: "v3.0" or "v2.1".
        video: camera arrays as mp4 (True) or PNG images embedded in the data parquet (False).
        codec: "h264" (libx264) or "av1" (libsvtav1).
        gop: keyframe interval (lerobot uses 2, which keeps random access cheap).
        crf: encoder quality; the codec's default when None.
        episodes_per_file: v3.0 only; start a new data/video file after this many episodes (no limit when None).
        data_files_size_in_mb, video_files_size_in_mb: v3.0 only; start a new data/video file before an episode that
            would take the data file (its in-memory Arrow size) or a camera's video past this size, as lerobot does.
        feature_names: optional {feature: [names per dimension]} stored in info.json.
    """

    def __init__(
        self,
        root,
        fps: int,
        robot_type: str = "unknown",
        version: str = "v3.0",
        video: bool = True,
        codec: str = "h264",
        gop: int = 2,
        crf: int | None = None,
        episodes_per_file: int | None = None,
        data_files_size_in_mb: float = DATA_FILES_SIZE_IN_MB,
        video_files_size_in_mb: float = VIDEO_FILES_SIZE_IN_MB,
        feature_names: Mapping[str, list] | None = None,
    ):
        if version not in ("v3.0", "v2.1"):
            raise ValueError(f"version: expected 'v3.0' or 'v2.1', got {version!r}")
        codec = CODEC_ALIASES.get(codec, codec)
        if codec not in CODECS:
            raise ValueError(f"codec: expected one of {sorted(CODECS) + sorted(CODEC_ALIASES)}, got {codec!r}")
        self.root = Path(root)
        if (self.root / "meta" / "info.json").exists():
            raise FileExistsError(f"a dataset already exists at {self.root}")
        crf = CODECS[codec][3] if crf is None else crf
        limits = (("fps", fps, 1, None), ("gop", gop, 1, None), ("crf", crf, 0, CODECS[codec][4]))
        for name, value, low, high in limits:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
                    (high is not None and value > high):  # the encoder would clamp it, or replace it, silently
                expected = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}] for {codec}"
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
        per_file = episodes_per_file
        if per_file is not None and (isinstance(per_file, bool) or not isinstance(per_file, (int, np.integer))
                                     or per_file < 1):  # fmt: skip
            raise ValueError(f"episodes_per_file: expected an integer ≥ 1 or None, got {episodes_per_file!r}")
        for name, size in (("data_files_size_in_mb", data_files_size_in_mb),
                           ("video_files_size_in_mb", video_files_size_in_mb)):  # fmt: skip
            if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)) or \
                    not 0 < size < float("inf"):
                raise ValueError(f"{name}: expected a positive number of megabytes, got {size!r}")
        self.fps, self.robot_type, self.version, self.video = fps, robot_type, version, video
        self.codec, self.gop, self.crf = codec, gop, crf
        self.episodes_per_file = episodes_per_file
        # as Python numbers, for info.json (a numpy float32 is not JSON)
        self.data_files_size_in_mb, self.video_files_size_in_mb = (
            int(size) if isinstance(size, (int, np.integer)) else float(size)
            for size in (data_files_size_in_mb, video_files_size_in_mb))
        self.feature_names = dict(feature_names or {})
        self.features: dict[str, dict] | None = None
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.episode_stats: list[dict] = []
        self.total_frames = 0
        self._numeric_history: dict[str, list[np.ndarray]] = {}
        self._file = (0, 0)  # (chunk_index, file_index) of the open v3 data/video files
        self._episodes_in_file = 0
        self._pending_tables: list[pa.Table] = []
        self._pending_bytes = 0
        self._videos: dict[str, VideoFileWriter] = {}
        self._frame_buffer: list[dict] = []
        self._frame_buffer_task: str | None = None
        self._finalized = False

    # ---- input ----
    def add_frame(self, frame: Mapping[str, np.ndarray], task: str):
        """Buffers one frame (per-frame arrays, e.g. image [H, W, 3], state [S]); `save_episode()` writes them."""
        if self._frame_buffer_task not in (None, task):
            raise ValueError(f"add_frame: task changed within an episode ({self._frame_buffer_task!r} → {task!r})")
        self._frame_buffer.append({key: np.asarray(value) for key, value in frame.items()})
        self._frame_buffer_task = task

    def save_episode(self):
        if not self._frame_buffer:
            raise ValueError("save_episode: no frames were added")
        keys = sorted(self._frame_buffer[0])
        for i, frame in enumerate(self._frame_buffer[1:], start=1):
            if sorted(frame) != keys:
                raise ValueError(f"save_episode: frame {i} has keys {sorted(frame)}, frame 0 has {keys}")
        frames = {key: np.stack([f[key] for f in self._frame_buffer]) for key in self._frame_buffer[0]}
        task = self._frame_buffer_task
        self._frame_buffer, self._frame_buffer_task = [], None
        self.add_episode(frames, task)

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str):
        """Appends one episode: `frames` maps feature keys to arrays with the frame count as first dimension."""
        if self._finalized:
            raise RuntimeError("add_episode: the writer is already finalized")
        if not isinstance(task, str) or not task:
            raise ValueError(f"add_episode: task must be a non-empty string, got {task!r}")
        frames = {key: np.asarray(value) for key, value in frames.items()}
        lengths = {key: len(value) for key, value in frames.items()}
        if not frames or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"add_episode: every feature needs the same non-zero number of frames, got {lengths}")
        if self.features is None:
            self.features = self._infer_features(frames)
        self._check_matches_features(frames)
        length = next(iter(lengths.values()))
        episode_index = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        columns = self._default_columns(length, episode_index, task_index)
        table = self._episode_table(frames, columns)
        if self.version == "v3.0" and self._file_is_full(table, length):
            self._roll_file()
        row = {"episode_index": episode_index, "tasks": [task], "length": length}
        self._write_episode_data(table, episode_index, row)
        row.update(self._write_episode_media(frames, episode_index, length))
        stats = self._episode_stats(frames, columns)
        self.episodes.append(row)
        self.episode_stats.append(stats)
        self.total_frames += length
        self._episodes_in_file += 1

    # ---- features ----
    def _infer_features(self, frames: Mapping[str, np.ndarray]) -> dict[str, dict]:
        features = {}
        for key, value in frames.items():
            if key in DEFAULT_FEATURES or key == "task":
                raise ValueError(f"add_episode: {key!r} is added by the writer and must not be given")
            if _is_camera(value):
                feature = {
                    "dtype": "video" if self.video else "image",
                    "shape": list(value.shape[1:]),
                    "names": ["height", "width", "channels"],
                }
                if self.video:
                    check_video_size(value.shape[1], value.shape[2], self.codec, f"add_episode: camera {key!r}")
                    feature["info"] = self._video_info(value.shape[1], value.shape[2])
            elif value.ndim in (1, 2):
                dtype = "float32" if np.issubdtype(value.dtype, np.floating) else _integer_or_bool(value.dtype)
                feature = {"dtype": dtype, "shape": [1 if value.ndim == 1 else value.shape[1]],
                           "names": self.feature_names.get(key)}
            else:
                raise ValueError(
                    f"add_episode: {key!r} has shape {list(value.shape)}; expected uint8 [N, H, W, 3] or [N] / [N, D]"
                )
            features[key] = feature
        for key in DEFAULT_FEATURES:
            features[key] = {"dtype": "float32" if key == "timestamp" else "int64", "shape": [1], "names": None}
        return features

    def _video_info(self, height: int, width: int) -> dict:
        info = {
            "video.height": height,
            "video.width": width,
            "video.codec": CODECS[self.codec][1],
            "video.pix_fmt": "yuv420p",
            "video.fps": self.fps,
            "video.channels": 3,
            "has_audio": False,
        }
        if self.version == "v2.1":
            info["video.is_depth_map"] = False
            return info
        info.update({
            "video.g": self.gop,
            "video.crf": self.crf,
            "video.preset": CODECS[self.codec][2].get("preset"),
            "video.fast_decode": 0,
            "video.video_backend": "pyav",
            "video.extra_options": {},
            "is_depth_map": False,
        })
        return info

    def _check_matches_features(self, frames: Mapping[str, np.ndarray]):
        expected = [k for k in self.features if k not in DEFAULT_FEATURES]
        if sorted(frames) != sorted(expected):
            raise ValueError(f"add_episode: expected features {expected}, got {list(frames)}")
        for key in expected:
            shape = self.features[key]["shape"]
            got = list(frames[key].shape[1:]) or [1]
            if got != shape:
                raise ValueError(f"add_episode: {key!r} expected per-frame shape {shape}, got {got}")
            dtype = self.features[key]["dtype"]
            if dtype in ("video", "image") and frames[key].dtype != np.uint8:
                raise ValueError(f"add_episode: camera {key!r} must be uint8, got {frames[key].dtype}")
            if dtype not in ("video", "image") and frames[key].dtype.kind not in STORED_KINDS[dtype]:
                # the first episode fixed the column type
                raise ValueError(f"add_episode: {key!r} is stored as {dtype} (set by the first episode), "
                                 f"got {frames[key].dtype}")

    def _camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] in ("video", "image")]

    def _default_columns(self, length: int, episode_index: int, task_index: int) -> dict[str, np.ndarray]:
        frame_index = np.arange(length, dtype=np.int64)
        return {
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(length, episode_index, dtype=np.int64),
            "index": self.total_frames + frame_index,
            "task_index": np.full(length, task_index, dtype=np.int64),
        }

    # ---- files ----
    def _data_path(self, episode_index: int) -> Path:
        if self.version == "v2.1":
            return self.root / V21_DATA_PATH.format(episode_chunk=episode_index // CHUNKS_SIZE,
                                                    episode_index=episode_index)
        return self.root / V3_DATA_PATH.format(chunk_index=self._file[0], file_index=self._file[1])

    def _video_path(self, key: str, episode_index: int) -> Path:
        if self.version == "v2.1":
            return self.root / V21_VIDEO_PATH.format(episode_chunk=episode_index // CHUNKS_SIZE, video_key=key,
                                                     episode_index=episode_index)
        return self.root / V3_VIDEO_PATH.format(video_key=key, chunk_index=self._file[0], file_index=self._file[1])

    def _file_is_full(self, table: pa.Table, length: int) -> bool:
        """Whether the open v3 files should be closed before an episode of `length` frames whose data is `table`."""
        if self._episodes_in_file == 0:  # an episode larger than the limits still gets a file of its own
            return False
        if self.episodes_per_file and self._episodes_in_file >= self.episodes_per_file:
            return True
        if self._pending_bytes + table.nbytes > self.data_files_size_in_mb * 2**20:
            return True
        # the episode's video is not encoded yet: estimated from the file's bytes per frame, as lerobot does
        limit = self.video_files_size_in_mb * 2**20
        return any(video.estimated_size(length) > limit for video in self._videos.values())

    def _roll_file(self):
        self._flush_data_file()
        for writer in self._videos.values():
            writer.close()
        self._videos = {}
        chunk, file = self._file
        self._file = (chunk + 1, 0) if file + 1 >= CHUNKS_SIZE else (chunk, file + 1)
        self._episodes_in_file = 0

    def _write_episode_media(self, frames, episode_index: int, length: int) -> dict:
        """Encodes the episode's camera frames; returns its v3 `videos/<key>/...` metadata columns."""
        row = {}
        if not self.video:
            return row
        for key in self._camera_keys():
            if self.version == "v2.1":
                writer = self._open_video(key, episode_index)
                writer.write(frames[key])
                writer.close()
                continue
            if key not in self._videos:
                self._videos[key] = self._open_video(key, episode_index)
            writer = self._videos[key]
            start = writer.frames_written
            writer.write(frames[key])
            row[f"videos/{key}/chunk_index"] = self._file[0]
            row[f"videos/{key}/file_index"] = self._file[1]
            row[f"videos/{key}/from_timestamp"] = start / self.fps
            row[f"videos/{key}/to_timestamp"] = (start + length) / self.fps
        return row

    def _open_video(self, key: str, episode_index: int) -> VideoFileWriter:
        return VideoFileWriter(self._video_path(key, episode_index), self.fps, self.codec, self.gop, self.crf)

    def _episode_table(self, frames, columns) -> pa.Table:
        arrays, fields = [], []
        for key, feature in self.features.items():
            values = columns[key] if key in DEFAULT_FEATURES else frames[key]
            if feature["dtype"] == "video":
                continue
            array, arrow_type = _to_arrow(values, feature)
            arrays.append(array)
            fields.append(pa.field(key, arrow_type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=self._hf_metadata()))

    def _write_episode_data(self, table: pa.Table, episode_index: int, row: dict):
        if self.version == "v2.1":
            _write_parquet(table, self._data_path(episode_index))
            return
        row["data/chunk_index"], row["data/file_index"] = self._file
        row["dataset_from_index"] = self.total_frames
        row["dataset_to_index"] = self.total_frames + table.num_rows
        self._pending_tables.append(table)
        self._pending_bytes += table.nbytes

    def _flush_data_file(self):
        if self._pending_tables:
            _write_parquet(pa.concat_tables(self._pending_tables), self._data_path(-1))
            self._pending_tables, self._pending_bytes = [], 0

    def _hf_metadata(self) -> dict:
        """The `huggingface` schema metadata (HF `datasets` Features JSON) that lerobot's parquet files carry."""
        list_type = "List" if self.version == "v3.0" else "Sequence"
        hf_features = {}
        for key, feature in self.features.items():
            if feature["dtype"] == "video":
                continue
            if feature["dtype"] == "image":
                hf_features[key] = {"_type": "Image"}
            elif feature["shape"] == [1]:
                hf_features[key] = {"dtype": feature["dtype"], "_type": "Value"}
            else:
                hf_features[key] = {"feature": {"dtype": feature["dtype"], "_type": "Value"},
                                    "length": feature["shape"][0], "_type": list_type}
        return {"huggingface": json.dumps({"info": {"features": hf_features}})}

    # ---- statistics ----
    def _episode_stats(self, frames, columns) -> dict[str, dict]:
        stats = {}
        for key, feature in self.features.items():
            if feature["dtype"] in ("video", "image"):
                stats[key] = _image_stats(frames[key])
                continue
            values = columns[key] if key in DEFAULT_FEATURES else frames[key]
            values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
            self._numeric_history.setdefault(key, []).append(values)
            stats[key] = _numeric_stats(values)
        return stats

    def _dataset_stats(self) -> dict[str, dict]:
        stats = {}
        for key, feature in self.features.items():
            if feature["dtype"] in ("video", "image"):
                stats[key] = _aggregate_stats([s[key] for s in self.episode_stats])
            else:
                stats[key] = _numeric_stats(np.concatenate(self._numeric_history[key]))
        return stats

    # ---- metadata ----
    def finalize(self):
        """Closes the open files and writes meta/; the dataset is readable afterwards."""
        if self._finalized:
            return
        if self._frame_buffer:
            self.save_episode()
        if not self.episodes:
            raise ValueError("finalize: no episodes were added")
        self._flush_data_file()
        for writer in self._videos.values():
            writer.close()
        self._videos = {}
        meta = self.root / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        _write_json(meta / "info.json", self._info())
        _write_json(meta / "stats.json", self._dataset_stats())
        if self.version == "v3.0":
            self._write_v3_meta(meta)
        else:
            self._write_v21_meta(meta)
        self._finalized = True

    def _info(self) -> dict:
        n_episodes, has_video = len(self.episodes), bool(self.video and self._camera_keys())
        info = {"codebase_version": self.version, "robot_type": self.robot_type, "total_episodes": n_episodes,
                "total_frames": self.total_frames, "total_tasks": len(self.tasks)}
        if self.version == "v3.0":
            info.update({"chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": self.data_files_size_in_mb,
                         "video_files_size_in_mb": self.video_files_size_in_mb,
                         "fps": self.fps, "splits": {"train": f"0:{n_episodes}"}, "data_path": V3_DATA_PATH,
                         "video_path": V3_VIDEO_PATH if has_video else None})
        else:
            n_videos = n_episodes * len(self._camera_keys()) if has_video else 0
            info.update({"total_videos": n_videos, "total_chunks": (n_episodes - 1) // CHUNKS_SIZE + 1,
                         "chunks_size": CHUNKS_SIZE, "fps": self.fps, "splits": {"train": f"0:{n_episodes}"},
                         "data_path": V21_DATA_PATH, "video_path": V21_VIDEO_PATH if has_video else None})
        info["features"] = self.features
        return info

    def _write_v3_meta(self, meta: Path):
        import pandas as pd

        # lerobot stores the task string as the pandas index, so pd.read_parquet gives a frame indexed by task
        tasks = pa.Table.from_pandas(pd.DataFrame({"task_index": list(self.tasks.values())},
                                                  index=pd.Index(list(self.tasks), name="task")))
        string_task = tasks.schema.set(tasks.schema.get_field_index("task"), pa.field("task", pa.string()))
        _write_parquet(tasks.cast(string_task), meta / "tasks.parquet")
        rows = []
        for row, stats in zip(self.episodes, self.episode_stats):
            row = dict(row)
            for key, feature_stats in stats.items():
                for name, value in feature_stats.items():
                    row[f"stats/{key}/{name}"] = value
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            rows.append(row)
        _write_parquet(pa.Table.from_pylist(rows), meta / "episodes" / "chunk-000" / "file-000.parquet")

    def _write_v21_meta(self, meta: Path):
        _write_jsonl(meta / "tasks.jsonl", [{"task_index": i, "task": t} for t, i in self.tasks.items()])
        _write_jsonl(meta / "episodes.jsonl", self.episodes)
        keep = ("min", "max", "mean", "std", "count")
        _write_jsonl(meta / "episodes_stats.jsonl", [
            {"episode_index": row["episode_index"],
             "stats": {key: {k: s[k] for k in keep} for key, s in stats.items()}}
            for row, stats in zip(self.episodes, self.episode_stats)
        ])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.finalize()
        else:
            for writer in self._videos.values():
                writer.close()


class VideoFileWriter:
    """Appends RGB frames to one mp4 with consecutive timestamps (frame i at i / fps)."""

    def __init__(self, path: Path, fps: int, codec: str, gop: int, crf: int):
        import av

        encoder, _, extra_options, _, _ = CODECS[codec]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.codec = path, codec
        self.container = av.open(str(path), "w", options={"movflags": "faststart"})
        self.stream = self.container.add_stream(encoder, rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"g": str(gop), "crf": str(crf), **extra_options}
        self.time_base = Fraction(1, fps)
        self.frames_written = 0
        self.packets_written = self.bytes_written = 0  # the encoder holds frames back (lookahead): fewer packets

    def write(self, frames: np.ndarray):
        import av

        if self.frames_written == 0:
            check_video_size(frames.shape[1], frames.shape[2], self.codec, f"video {self.path}")
            self.stream.height, self.stream.width = frames.shape[1:3]
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames_written, self.time_base
            self._mux(self.stream.encode(frame))
            self.frames_written += 1

    def _mux(self, packets):
        self.packets_written += len(packets)
        self.bytes_written += sum(packet.size for packet in packets)
        self.container.mux(packets)

    def estimated_size(self, more_frames: int) -> float:
        """Bytes of the file once `more_frames` more frames are written, at its bytes per encoded frame so far (0 while
        the encoder has returned nothing)."""
        if not self.packets_written:
            return 0.0
        return self.bytes_written / self.packets_written * (self.frames_written + more_frames)

    def close(self):
        if self.container is not None:
            if self.frames_written:  # an encoder that never opened has nothing to flush
                self._mux(self.stream.encode())
            self.container.close()
            self.container = None


# ---- helpers ----
def check_video_size(height: int, width: int, codec: str, field: str) -> None:
    """h264 in yuv420p halves the chroma planes: libx264 refuses odd sides (with an FFmpeg error naming neither)."""
    if codec == "h264" and (height % 2 or width % 2):
        raise ValueError(f"{field}: h264 (yuv420p) needs an even height and width, got {height}x{width}; use "
                         "codec='av1', or crop / pad the images")


def _is_camera(value: np.ndarray) -> bool:
    return value.dtype == np.uint8 and value.ndim == 4 and value.shape[-1] == 3


# numpy dtype kinds each stored feature dtype takes without losing values (floats are stored as float32, as LeRobot
# does): a float into an integer or boolean column would be truncated
STORED_KINDS = {"float32": "fiub", "int64": "iub", "bool": "b"}


def _integer_or_bool(dtype) -> str:
    return "bool" if dtype == np.bool_ else "int64"


def _to_arrow(values: np.ndarray, feature: dict) -> tuple[pa.Array, pa.DataType]:
    if feature["dtype"] == "image":
        arrow_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        cells = [{"bytes": _png_bytes(image), "path": f"frame-{i:06d}.png"} for i, image in enumerate(values)]
        return pa.array(cells, type=arrow_type), arrow_type
    value_type = {"float32": pa.float32(), "int64": pa.int64(), "bool": pa.bool_()}[feature["dtype"]]
    flat = np.asarray(values).astype(np.dtype(feature["dtype"]))
    if feature["shape"] == [1]:
        return pa.array(flat.reshape(-1), type=value_type), value_type
    arrow_type = pa.list_(value_type, feature["shape"][0])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), type=arrow_type), arrow_type


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _numeric_stats(values: np.ndarray) -> dict[str, list]:
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    stats.update({name: np.quantile(values, q, axis=0) for name, q in STAT_QUANTILES.items()})
    out = {name: array.astype(np.float64).tolist() for name, array in stats.items()}
    out["count"] = [int(len(values))]
    return out


def _image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel statistics in [0, 1], shaped [3][1][1] like lerobot's, from at most 32 evenly spaced frames."""
    picked = frames[np.linspace(0, len(frames) - 1, min(len(frames), IMAGE_STATS_MAX_FRAMES)).round().astype(int)]
    pixels = picked.reshape(-1, 3).astype(np.float64) / 255.0
    stats = _numeric_stats(pixels)
    out = {name: [[[v]] for v in values] for name, values in stats.items() if name != "count"}
    out["count"] = [int(len(picked))]
    return out


def _aggregate_stats(per_episode: list[dict]) -> dict[str, list]:
    """Combines per-episode statistics: exact min/max/mean/std, count-weighted means of the quantiles."""
    counts = np.array([s["count"][0] for s in per_episode], dtype=np.float64)
    weights = (counts / counts.sum()).reshape(-1, *([1] * np.asarray(per_episode[0]["mean"]).ndim))

    def stacked(name):
        return np.stack([np.asarray(s[name], dtype=np.float64) for s in per_episode])

    means, stds = stacked("mean"), stacked("std")
    mean = (weights * means).sum(0)
    variance = (weights * (stds**2 + means**2)).sum(0) - mean**2
    out = {"min": stacked("min").min(0), "max": stacked("max").max(0), "mean": mean,
           "std": np.sqrt(np.maximum(variance, 0.0))}
    out.update({name: (weights * stacked(name)).sum(0) for name in STAT_QUANTILES})
    out = {name: array.tolist() for name, array in out.items()}
    out["count"] = [int(counts.sum())]
    return out


def _write_parquet(table: pa.Table, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_json(path: Path, value):
    path.write_text(json.dumps(value, indent=4) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def synthetic_episodes(num_episodes: int = 3, length: int = 12, size: int = 32, state_dim: int = 4,
                       action_dim: int = 4, cameras=("front", "wrist"), seed: int = 0) -> list[dict]:
    """Episodes whose pixels encode (episode, frame): camera c of frame f in episode e is filled with
    `pixel_value(e, f, c)`, so a decoded frame can be identified from its mean even after lossy compression."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(num_episodes):
        n = length + e  # different lengths catch off-by-one errors at episode boundaries
        frames = {}
        for c, camera in enumerate(cameras):
            values = np.array([pixel_value(e, f, c) for f in range(n)], dtype=np.uint8)
            frames[f"observation.images.{camera}"] = np.broadcast_to(values[:, None, None, None],
                                                                     (n, size, size, 3)).copy()
        frames["observation.state"] = rng.normal(size=(n, state_dim)).astype(np.float32)
        frames["action"] = rng.normal(size=(n, action_dim)).astype(np.float32)
        episodes.append({"task": f"task number {e % 2}", "frames": frames})
    return episodes


def pixel_value(episode: int, frame: int, camera: int = 0) -> int:
    return (16 + 5 * frame + 60 * episode + 30 * camera) % 240


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Write a small synthetic LeRobot v3.0 dataset (with videos).")
    parser.add_argument("out", nargs="?", help="dataset folder to create (default: a new temporary folder)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lerobot_tiny_")) / "dataset"
    write_lerobot_dataset(out, synthetic_episodes(), fps=10, robot_type="synthetic")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>8}  {path.relative_to(out)}")
    print(f"wrote {out}; read it back with: python -m hf_vla.data.lerobot {out}")
