"""LeRobot v3.0 / v2.1 datasets written by our writer and read back by our reader (no `lerobot` package)."""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer

from hf_vla import VLAProcessor
from hf_vla.data import LeRobotWriter, PyAVDecoder, VideoDecodeError, load_lerobot, write_lerobot_dataset
from hf_vla.data.lerobot import compute_union_stats
from hf_vla.data.lerobot_writer import pixel_value, synthetic_episodes
from hf_vla.data.video import decode_frames_naively
from hf_vla.normalization import absolute_actions

FPS = 10
FRONT, WRIST = "observation.images.front", "observation.images.wrist"
H264_TOLERANCE = 3.0  # mean pixel error of a flat 32x32 frame after h264 at crf 23


@pytest.fixture(scope="module")
def episodes():
    return synthetic_episodes(num_episodes=3, length=12)  # lengths 12, 13, 14


@pytest.fixture(scope="module")
def roots(tmp_path_factory, episodes):
    base = tmp_path_factory.mktemp("lerobot")
    image_episodes = synthetic_episodes(num_episodes=3, length=12, state_dim=3, cameras=("front",))
    return {
        "v3": write_lerobot_dataset(base / "v3", episodes, FPS, robot_type="synthetic"),
        "v2.1": write_lerobot_dataset(base / "v21", episodes, FPS, version="v2.1"),
        "v3_split": write_lerobot_dataset(base / "v3_split", episodes, FPS, episodes_per_file=2),
        "v3_av1": write_lerobot_dataset(base / "v3_av1", episodes, FPS, codec="av1"),
        "image": write_lerobot_dataset(base / "image", image_episodes, FPS, video=False),
        "image_v2.1": write_lerobot_dataset(base / "image21", image_episodes, FPS, video=False, version="v2.1"),
    }


def all_frames(episodes, key):
    return np.concatenate([ep["frames"][key] for ep in episodes])


def row_of(episodes, episode, frame):
    return sum(len(ep["frames"]["action"]) for ep in episodes[:episode]) + frame


def test_v3_layout_matches_lerobot(roots):
    root = roots["v3"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == 39
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert "total_chunks" not in info and info["splits"] == {"train": "0:3"}
    assert info["features"][FRONT]["info"]["video.codec"] == "h264"
    assert info["features"]["frame_index"] == {"dtype": "int64", "shape": [1], "names": None}
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.column_names == ["observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                                 "task_index"]
    assert str(data.schema.field("action").type).startswith("fixed_size_list")
    assert b"huggingface" in data.schema.metadata
    assert data.column("index").to_pylist() == list(range(39))
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    assert tasks.index.name == "task" and tasks.loc["task number 1", "task_index"] == 1
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    assert meta["dataset_to_index"].tolist() == [12, 25, 39]
    assert meta[f"videos/{FRONT}/from_timestamp"].tolist() == [0.0, 1.2, 2.5]
    assert "stats/action/q99" in meta and "meta/episodes/file_index" in meta
    assert sorted(p.name for p in (root / "videos").rglob("*.mp4")) == ["file-000.mp4"] * 2
    stats = json.loads((root / "meta/stats.json").read_text())
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert np.asarray(stats[FRONT]["mean"]).shape == (3, 1, 1) and stats["index"]["count"] == [39]


def test_v3_metadata_values_match_the_episodes(roots, episodes, tmp_path):
    """Values (not only keys) of info.json, the episodes parquet and the data parquet, computed from the inputs."""
    root = roots["v3"]
    info = json.loads((root / "meta/info.json").read_text())
    assert (info["total_tasks"], info["fps"], info["robot_type"], info["chunks_size"]) == (2, FPS, "synthetic", 1000)
    assert info["features"][FRONT] == {
        "dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"],
        "info": {"video.height": 32, "video.width": 32, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                 "video.fps": 10, "video.channels": 3, "has_audio": False, "video.g": 2, "video.crf": 23,
                 "video.preset": None, "video.fast_decode": 0, "video.video_backend": "pyav",
                 "video.extra_options": {}, "is_depth_map": False}}
    av1 = json.loads((roots["v3_av1"] / "meta/info.json").read_text())["features"][FRONT]["info"]
    assert (av1["video.codec"], av1["video.crf"], av1["video.preset"]) == ("av1", 30, "12")
    tuned = write_lerobot_dataset(tmp_path / "tuned", synthetic_episodes(1, 2, size=16, cameras=("front",)), FPS,
                                  crf=40, gop=3)
    tuned_info = json.loads((tuned / "meta/info.json").read_text())["features"][FRONT]["info"]
    assert (tuned_info["video.crf"], tuned_info["video.g"]) == (40, 3)
    lengths = [len(ep["frames"]["action"]) for ep in episodes]  # 12, 13, 14
    starts = np.cumsum([0] + lengths[:-1]).tolist()
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    assert meta["length"].tolist() == lengths and meta["dataset_from_index"].tolist() == starts
    assert [list(t) for t in meta["tasks"]] == [[ep["task"]] for ep in episodes]
    for key in (FRONT, WRIST):  # seconds into the concatenated mp4: [start, start + length) / fps
        assert meta[f"videos/{key}/to_timestamp"].tolist() == pytest.approx([(s + n) / FPS for s, n in zip(starts, lengths)])
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    expected_timestamps = np.concatenate([np.arange(n) / FPS for n in lengths])  # restarts at 0 in every episode
    np.testing.assert_allclose(data.column("timestamp").to_numpy(), expected_timestamps, rtol=1e-6)
    hf = json.loads(data.schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["action"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 4, "_type": "List"}
    assert hf["index"] == {"dtype": "int64", "_type": "Value"}
    v21 = json.loads(pq.read_table(roots["v2.1"] / "data/chunk-000/episode_000000.parquet").schema.metadata[b"huggingface"])
    assert v21["info"]["features"]["action"]["_type"] == "Sequence"  # datasets 2.x, which lerobot v2.1 used
    for name in ("image", "image_v2.1"):  # no camera is a video: lerobot writes video_path null
        image_info = json.loads((roots[name] / "meta/info.json").read_text())
        assert image_info["video_path"] is None and image_info["features"][FRONT]["dtype"] == "image", name
    v21_stats = json.loads((roots["v2.1"] / "meta/episodes_stats.jsonl").read_text().splitlines()[2])["stats"]
    assert set(v21_stats["action"]) == {"min", "max", "mean", "std", "count"}
    np.testing.assert_allclose(v21_stats["action"]["std"], episodes[2]["frames"]["action"].std(0), rtol=1e-5)
    images = pq.read_table(roots["image"] / "data/chunk-000/file-000.parquet").column(FRONT).to_pylist()
    assert [cell["path"] for cell in images[:13]] == [f"frame-{i:06d}.png" for i in range(12)] + ["frame-000000.png"]


def test_v3_split_files_and_keyframes(roots):
    split = pq.read_table(roots["v3_split"] / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    assert split["data/file_index"].tolist() == [0, 0, 1] and split["data/chunk_index"].tolist() == [0, 0, 0]
    assert split[f"videos/{FRONT}/file_index"].tolist() == [0, 0, 1]
    assert split[f"videos/{FRONT}/from_timestamp"].tolist() == [0.0, 1.2, 0.0]  # a new file starts at 0
    assert (roots["v3_split"] / f"videos/{FRONT}/chunk-000/file-001.mp4").is_file()
    import av

    with av.open(str(roots["v3"] / f"videos/{FRONT}/chunk-000/file-000.mp4")) as container:
        keyframes = [frame.key_frame for frame in container.decode(video=0)]
    # gop 2, as info.json says: no two frames in a row without a keyframe (libx264's default interval is 250)
    assert len(keyframes) == 39 and all(keyframes[i] or keyframes[i + 1] for i in range(38))


def test_stats_json_and_episode_stats_match_numpy(roots, episodes):
    """meta/stats.json: exact numeric statistics over every frame; per-channel image statistics in [0, 1] combined
    over the episodes (exact mean/std, count-weighted quantiles); the episodes parquet holds each episode's own."""
    stats = json.loads((roots["v3"] / "meta/stats.json").read_text())
    actions = all_frames(episodes, "action").astype(np.float64)
    for name, value in [("min", actions.min(0)), ("max", actions.max(0)), ("mean", actions.mean(0)),
                        ("std", actions.std(0)), ("q01", np.quantile(actions, 0.01, axis=0)),
                        ("q10", np.quantile(actions, 0.10, axis=0)), ("q50", np.median(actions, axis=0)),
                        ("q99", np.quantile(actions, 0.99, axis=0))]:
        np.testing.assert_allclose(stats["action"][name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert stats["action"]["count"] == [39] and stats["timestamp"]["max"] == pytest.approx([1.3])
    assert stats["task_index"]["mean"] == pytest.approx([(12 * 0 + 13 * 1 + 14 * 0) / 39])
    lengths = [12, 13, 14]
    pixels = np.concatenate([[pixel_value(e, f, 0) for f in range(n)] for e, n in enumerate(lengths)]) / 255.0
    front = {name: np.asarray(value).reshape(-1) for name, value in stats[FRONT].items()}
    for name, value in [("min", pixels.min()), ("max", pixels.max()), ("mean", pixels.mean()), ("std", pixels.std())]:
        np.testing.assert_allclose(front[name], [value] * 3, rtol=1e-9, err_msg=name)
    per_episode_q90 = [np.quantile(np.repeat([pixel_value(e, f, 0) / 255.0 for f in range(n)], 32 * 32), 0.9)
                       for e, n in enumerate(lengths)]  # over every pixel of the (flat) 32x32 frames
    np.testing.assert_allclose(front["q90"], [np.average(per_episode_q90, weights=lengths)] * 3, rtol=1e-9)
    assert stats[FRONT]["count"] == [39] and np.asarray(stats[FRONT]["q01"]).shape == (3, 1, 1)
    meta = pq.read_table(roots["v3"] / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    np.testing.assert_allclose(meta["stats/action/std"][1], episodes[1]["frames"]["action"].std(0), rtol=1e-5)
    episode_stats = pq.read_table(roots["v3"] / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    np.testing.assert_allclose(np.asarray(episode_stats[2][f"stats/{FRONT}/mean"]).reshape(-1),
                               [np.mean([pixel_value(2, f, 0) for f in range(14)]) / 255.0] * 3, rtol=1e-9)
    long = np.broadcast_to(np.arange(100, dtype=np.uint8)[:, None, None, None], (100, 2, 2, 3)).copy()
    from hf_vla.data.lerobot_writer import _image_stats

    image = _image_stats(long)  # at most 32 evenly spaced frames: 0, 3.19…, …, 99 rounded
    picked = np.linspace(0, 99, 32).round() / 255.0
    assert image["count"] == [32] and np.asarray(image["mean"]).reshape(-1) == pytest.approx([picked.mean()] * 3)


def assert_reads_back_exactly(root, source, cameras=()):
    """Every frame of `root` against the episodes it was written from: values, indices, timestamps, instructions and
    (flat synthetic) camera views, plus the episode metadata's row ranges."""
    ds = load_lerobot(root, action_horizon=1, cameras=list(cameras))
    lengths = [len(ep["frames"]["action"]) for ep in source]
    assert len(ds) == sum(lengths) and ds.num_episodes == len(source)
    states, actions = all_frames(source, "observation.state"), all_frames(source, "action")
    episode_of, frame_of = np.repeat(np.arange(len(source)), lengths), np.concatenate([np.arange(n) for n in lengths])
    np.testing.assert_array_equal(ds._states, states)
    np.testing.assert_array_equal(ds._actions, actions)
    np.testing.assert_array_equal(ds._episode_index, episode_of)
    np.testing.assert_array_equal(ds._frame_index, frame_of)
    np.testing.assert_allclose(ds._timestamp, frame_of / FPS, rtol=1e-6)
    for row in range(len(ds)):
        sample = ds[row]
        episode, frame = sample["episode_index"], sample["frame_index"]
        assert (episode, frame) == (episode_of[row], frame_of[row])
        assert sample["instruction"] == source[episode]["task"]
        for camera, key in enumerate(cameras):  # frames of the second or later episode of a file start mid-file
            assert abs(sample["images"][key].mean() - pixel_value(episode, frame, camera)) < H264_TOLERANCE, (row, key)
    data_index = np.concatenate([pq.read_table(root / path).column("index").to_numpy()
                                 for path in dict.fromkeys(ep["data_file"] for ep in ds.episodes.values())])
    np.testing.assert_array_equal(data_index, np.arange(len(ds)))  # global, across files
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    starts = np.cumsum([0] + lengths[:-1])
    assert meta["dataset_from_index"].tolist() == starts.tolist()
    assert meta["dataset_to_index"].tolist() == (starts + lengths).tolist()
    return meta


def file_layout(meta, prefix):
    """(chunk_index, file_index) per episode from the episodes parquet, for "data" or "videos/<key>"."""
    return list(zip(meta[f"{prefix}/chunk_index"], meta[f"{prefix}/file_index"]))


def expected_video_offsets(layout, lengths):
    """[from, to) seconds of each episode in its file: files restart at 0."""
    out, position = [], {}
    for where, n in zip(layout, lengths):
        start = position.get(where, 0)
        out.append((start / FPS, (start + n) / FPS))
        position[where] = start + n
    return out


def test_v3_files_roll_over_into_the_next_chunk_after_chunks_size_files(tmp_path, monkeypatch):
    from hf_vla.data import lerobot_writer

    monkeypatch.setattr(lerobot_writer, "CHUNKS_SIZE", 2)
    source = synthetic_episodes(5, 3, size=16)  # lengths 3..7
    root = write_lerobot_dataset(tmp_path / "chunked", source, FPS, episodes_per_file=2)
    meta = assert_reads_back_exactly(root, source, cameras=(FRONT, WRIST))
    expected = [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]  # file-001 is the last of chunk-000 with 2 files a chunk
    assert file_layout(meta, "data") == expected
    lengths = [len(ep["frames"]["action"]) for ep in source]
    for key in (FRONT, WRIST):
        assert file_layout(meta, f"videos/{key}") == expected
        offsets = list(zip(meta[f"videos/{key}/from_timestamp"], meta[f"videos/{key}/to_timestamp"]))
        assert offsets == pytest.approx(expected_video_offsets(expected, lengths))
    assert sorted(str(p.relative_to(root)) for p in (root / "data").rglob("*.parquet")) == [
        "data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet", "data/chunk-001/file-000.parquet"]
    assert (root / f"videos/{WRIST}/chunk-001/file-000.mp4").is_file()
    info = json.loads((root / "meta/info.json").read_text())
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"], info["chunks_size"]) == (5, 25, 2, 2)
    assert info["splits"] == {"train": "0:5"}
    assert [list(t) for t in meta["tasks"]] == [[ep["task"]] for ep in source]
    # statistics do not depend on how the episodes are split into files
    whole = write_lerobot_dataset(tmp_path / "whole", source, FPS)
    assert json.loads((root / "meta/stats.json").read_text()) == json.loads((whole / "meta/stats.json").read_text())
    whole_meta = pq.read_table(whole / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    stats_columns = [c for c in meta.columns if c.startswith("stats/")]
    assert stats_columns and all(np.array_equal(np.stack(meta[c].map(np.stack)), np.stack(whole_meta[c].map(np.stack)))
                                 for c in stats_columns)  # fmt: skip


def test_v3_data_files_roll_over_at_data_files_size_in_mb(tmp_path):
    source = synthetic_episodes(5, 12, cameras=())  # 12..16 frames of state 4, action 4 and the 5 default columns
    row_bytes = 4 * 4 + 4 * 4 + 4 + 4 * 8  # in memory (Arrow): float32 values, float32 timestamp, four int64
    limit = 2000
    root = write_lerobot_dataset(tmp_path / "sized", source, FPS, video=False, data_files_size_in_mb=limit / 2**20)
    meta = assert_reads_back_exactly(root, source)
    expected, file, used = [], 0, 0  # an episode that would take the file past the limit starts the next one
    for episode in source:
        size = row_bytes * len(episode["frames"]["action"])
        if used and used + size > limit:
            file, used = file + 1, 0
        expected.append((0, file))
        used += size
    assert expected == [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2)]
    assert file_layout(meta, "data") == expected
    info = json.loads((root / "meta/info.json").read_text())
    assert info["data_files_size_in_mb"] == limit / 2**20 and info["video_files_size_in_mb"] == 200
    # a limit below one episode's size gives each episode a file of its own, never an empty one
    tiny = write_lerobot_dataset(tmp_path / "tiny", source, FPS, video=False, data_files_size_in_mb=1e-6)
    assert file_layout(assert_reads_back_exactly(tiny, source), "data") == [(0, e) for e in range(5)]
    assert len(list((tiny / "data").rglob("*.parquet"))) == 5


def test_v3_video_files_roll_over_at_video_files_size_in_mb(tmp_path):
    source = synthetic_episodes(4, 6, size=16)
    lengths = [len(ep["frames"]["action"]) for ep in source]
    for limit, expected in ((1e-6, [(0, e) for e in range(4)]), (200, [(0, 0)] * 4)):
        root = write_lerobot_dataset(tmp_path / str(limit), source, FPS, video_files_size_in_mb=limit)
        meta = assert_reads_back_exactly(root, source, cameras=(FRONT, WRIST))
        for key in ("data", f"videos/{FRONT}", f"videos/{WRIST}"):  # data and videos roll over together
            assert file_layout(meta, key) == expected, (limit, key)
        offsets = list(zip(meta[f"videos/{WRIST}/from_timestamp"], meta[f"videos/{WRIST}/to_timestamp"]))
        assert offsets == pytest.approx(expected_video_offsets(expected, lengths))
        assert len(list((root / "videos" / FRONT).rglob("*.mp4"))) == len(set(expected))
    for size, message in ((0, "got 0"), (-1.5, "got -1.5"), (float("inf"), "got inf"), ("100", "got '100'")):
        with pytest.raises(ValueError, match=f"video_files_size_in_mb: expected a positive number of megabytes, "
                                             f"{message}"):
            LeRobotWriter(tmp_path / "bad", FPS, video_files_size_in_mb=size)
    with pytest.raises(ValueError, match="data_files_size_in_mb: expected a positive number of megabytes, got True"):
        LeRobotWriter(tmp_path / "bad", FPS, data_files_size_in_mb=True)
    numpy = write_lerobot_dataset(tmp_path / "numpy", source[:1], FPS, video=False,
                                  data_files_size_in_mb=np.float32(0.5), video_files_size_in_mb=np.int64(3))
    info = json.loads((numpy / "meta/info.json").read_text())
    assert (info["data_files_size_in_mb"], info["video_files_size_in_mb"]) == (0.5, 3)


def test_v21_chunks_follow_chunks_size(tmp_path, monkeypatch):
    from hf_vla.data import lerobot_writer

    monkeypatch.setattr(lerobot_writer, "CHUNKS_SIZE", 2)
    source = synthetic_episodes(4, 3, size=16, cameras=("front",))
    root = write_lerobot_dataset(tmp_path / "v21", source, FPS, version="v2.1")
    info = json.loads((root / "meta/info.json").read_text())
    assert (info["total_chunks"], info["chunks_size"], info["total_videos"]) == (2, 2, 4)
    assert (root / "data/chunk-001/episode_000003.parquet").is_file()
    assert (root / f"videos/chunk-001/{FRONT}/episode_000002.mp4").is_file()
    lines = [json.loads(line) for line in (root / "meta/episodes.jsonl").read_text().splitlines()]
    assert [(row["episode_index"], row["tasks"], row["length"]) for row in lines] == \
        [(e, [f"task number {e % 2}"], 3 + e) for e in range(4)]
    assert [json.loads(line) for line in (root / "meta/tasks.jsonl").read_text().splitlines()] == \
        [{"task_index": 0, "task": "task number 0"}, {"task_index": 1, "task": "task number 1"}]
    monkeypatch.setattr(lerobot_writer, "CHUNKS_SIZE", 3)
    three = write_lerobot_dataset(tmp_path / "three", source[:3], FPS, version="v2.1", video=False)
    assert json.loads((three / "meta/info.json").read_text())["total_chunks"] == 1  # 3 episodes fill one chunk


def test_tasks_written_by_lerobot_0_4_are_read(roots, tmp_path):
    # lerobot 0.4.4 keeps the task strings in an unnamed pandas index (physical column "__index_level_0__")
    root = shutil.copytree(roots["v3"], tmp_path / "old_tasks")
    pd.DataFrame({"task_index": [0, 1]}, index=["task number 0", "task number 1"]).to_parquet(root / "meta/tasks.parquet")
    assert "__index_level_0__" in pq.read_table(root / "meta/tasks.parquet").column_names
    assert load_lerobot(root, cameras=[])[20]["instruction"] == "task number 1"


def test_v21_layout(roots):
    root = roots["v2.1"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["total_chunks"] == 1 and info["total_videos"] == 6
    assert (root / f"videos/chunk-000/{FRONT}/episode_000002.mp4").is_file()
    assert (root / "data/chunk-000/episode_000001.parquet").is_file()
    lines = (root / "meta/episodes_stats.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["stats"]["action"]["count"] == [13]


def test_v21_episodes_are_read_from_their_chunk_folder(roots, episodes, tmp_path):
    # v2.1 puts episode e in chunk e // chunks_size; with chunks_size 2, episode 2 lives in chunk-001
    root = shutil.copytree(roots["v2.1"], tmp_path / "chunked")
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "chunks_size": 2, "total_chunks": 2}))
    (root / "data/chunk-001").mkdir()
    shutil.move(root / "data/chunk-000/episode_000002.parquet", root / "data/chunk-001/episode_000002.parquet")
    for camera in (FRONT, WRIST):
        (root / f"videos/chunk-001/{camera}").mkdir(parents=True)
        shutil.move(root / f"videos/chunk-000/{camera}/episode_000002.mp4",
                    root / f"videos/chunk-001/{camera}/episode_000002.mp4")
    ds = load_lerobot(root)
    row = row_of(episodes, 2, 5)
    sample = ds[row]
    assert (sample["episode_index"], sample["frame_index"]) == (2, 5)
    np.testing.assert_array_equal(sample["actions"][0], episodes[2]["frames"]["action"][5])
    assert abs(sample["images"][WRIST].mean() - pixel_value(2, 5, 1)) < H264_TOLERANCE


def test_negative_indices_count_from_the_end(roots, episodes):
    ds = load_lerobot(roots["v3"], action_horizon=2, cameras=[])
    last, first = ds[-1], ds[-len(ds)]
    assert (last["episode_index"], last["frame_index"]) == (2, 13)
    np.testing.assert_array_equal(last["actions"][0], episodes[2]["frames"]["action"][13])
    assert (first["episode_index"], first["frame_index"]) == (0, 0)
    with pytest.raises(IndexError):
        ds[-len(ds) - 1]


@pytest.mark.parametrize("name", ["v3", "v2.1", "v3_split", "image", "image_v2.1"])
def test_numeric_values_and_instructions_read_back(roots, episodes, name):
    source = synthetic_episodes(3, 12, state_dim=3, cameras=("front",)) if name.startswith("image") else episodes
    ds = load_lerobot(roots[name], action_horizon=1)
    assert len(ds) == 39 and ds.num_episodes == 3
    states, actions = all_frames(source, "observation.state"), all_frames(source, "action")
    for row in (0, 11, 12, 24, 25, 38):
        sample = ds[row]
        assert sample["state"].dtype == np.float32 and np.array_equal(sample["state"], states[row])
        assert np.array_equal(sample["actions"][0], actions[row])
        assert sample["instruction"] == f"task number {sample['episode_index'] % 2}"
    assert (ds[25]["episode_index"], ds[25]["frame_index"]) == (2, 0)


def test_action_chunk_is_padded_and_masked_at_episode_end(roots, episodes):
    ds = load_lerobot(roots["v3"], action_horizon=5, cameras=[])
    actions = episodes[0]["frames"]["action"]
    sample = ds[9]  # frames 9, 10, 11 exist in episode 0 (length 12), then two padded steps
    assert sample["actions"].shape == (5, 4)
    assert sample["action_mask"].tolist() == [True, True, True, False, False]
    assert np.array_equal(sample["actions"], actions[[9, 10, 11, 11, 11]])
    assert ds[0]["action_mask"].all() and ds[38]["action_mask"].tolist() == [True] + [False] * 4


def test_action_modes_against_hand_computation(roots, episodes):
    frames = episodes[1]["frames"]
    s0, a = frames["observation.state"][3], frames["action"][3:6]
    by_mode = {mode: load_lerobot(roots["v3"], action_horizon=3, cameras=[], action_mode=mode)[row_of(episodes, 1, 3)]
               for mode in ("abs", "delta", "rel")}
    np.testing.assert_allclose(by_mode["abs"]["actions"], a)
    np.testing.assert_allclose(by_mode["rel"]["actions"], a - s0, rtol=1e-6)
    np.testing.assert_allclose(by_mode["delta"]["actions"], np.stack([a[0] - s0, a[1] - a[0], a[2] - a[1]]), rtol=1e-6)
    for mode in ("abs", "delta", "rel"):  # decoding with the state turns each back into the recorded actions
        np.testing.assert_allclose(absolute_actions(by_mode[mode]["actions"], s0, mode), a, rtol=1e-6, atol=1e-6)
    # delta padding happens in raw space, so padded steps are zero deltas
    end = load_lerobot(roots["v3"], action_horizon=3, cameras=[], action_mode="delta")[row_of(episodes, 1, 12)]
    assert end["action_mask"].tolist() == [True, False, False] and not end["actions"][1:].any()


def test_per_dimension_action_modes_leave_the_absolute_dimensions_as_recorded(roots, episodes, tiny_vlm_dirs):
    frames = episodes[1]["frames"]
    s0, a = frames["observation.state"][3], frames["action"][3:6]
    by_kind = {"abs": a, "rel": a - s0, "delta": np.stack([a[0] - s0, a[1] - a[0], a[2] - a[1]])}
    vlm = tiny_vlm_dirs["qwen2_5_vl"]
    processor = VLAProcessor(AutoImageProcessor.from_pretrained(vlm), AutoTokenizer.from_pretrained(vlm),
                             action_dim=4, action_horizon=3, state_dim=4)  # fmt: skip
    # StarVLA's delta for an arm whose last dimension is the gripper (openpi's is "rel"); and every kind at once
    for modes in (["delta"] * 3 + ["abs"], ["rel", "delta", "abs", "rel"]):
        ds = load_lerobot(roots["v3"], action_horizon=3, cameras=[], action_mode=modes)
        actions = ds[row_of(episodes, 1, 3)]["actions"]
        for d, kind in enumerate(modes):
            np.testing.assert_allclose(actions[:, d], by_kind[kind][:, d], rtol=1e-6, err_msg=f"{modes}[{d}]")
        stats = ds.compute_stats()
        assert stats["action_mode"] == modes  # saved per dimension: an hf_vla without them refuses the statistics
        # decoding with the state gives the recorded chunk back, every dimension
        processor.set_norm_stats("arm", {**stats, "action": {**stats["action"], "mode": ["identity"] * 4}})
        assert processor.embodiment_action_mode("arm") == modes
        np.testing.assert_allclose(processor.decode_actions(actions, unnorm_key="arm", state=s0), a, rtol=1e-6,
                                   atol=1e-6)  # fmt: skip
    for mode, message in ((["rel"] * 7, r"\['action_mode'\]: expected 4 per-dimension modes, got 7"),
                          (["rel", "up", "abs", "abs"], r"\['action_mode'\]: unknown action mode\(s\) \['up'\]")):
        with pytest.raises(ValueError, match=message):
            processor.set_norm_stats("bad", {**stats, "action_mode": mode})
    same = load_lerobot(roots["v3"], action_horizon=3, cameras=[], action_mode=["rel"] * 4)
    assert same.action_mode == "rel"  # one mode for every dimension is recorded as one string
    processor.set_norm_stats("arm", {**stats, "action_mode": ["rel"] * 4})
    processor.set_norm_stats("plain", {key: value for key, value in stats.items() if key != "action_mode"})
    assert [processor.embodiment_action_mode(k) for k in ("arm", "plain", "unknown")] == ["rel", "abs", "abs"]
    partly = load_lerobot(roots["v3"], action_horizon=3, cameras=[], action_mode=["rel"] * 3 + ["abs"])
    with pytest.raises(ValueError, match=r"different action modes \('rel' vs 'rel' on dimensions \[0, 1, 2\]\)"):
        compute_union_stats([same, partly])  # one key, one way back to absolute actions
    for mode, message in ((["rel"] * 3, r"action_mode: expected 4 per-dimension modes, got 3"),
                          ("relative", r"action_mode: unknown action mode\(s\) \['relative'\]"),
                          ([True] * 4, r"action_mode: expected one of \['abs', 'delta', 'rel'\] or one per action")):
        with pytest.raises(ValueError, match=message):
            load_lerobot(roots["v3"], cameras=[], action_mode=mode)


def test_a_wider_state_lines_up_with_the_relative_dimensions(tmp_path, tiny_vlm_dirs):
    # openpi's LIBERO layout: an 8-value state (eef position, axis-angle, two gripper fingers) under 7-D actions whose
    # first 6 dimensions are relative (its "delta" actions); here 6 state values under 4-D actions, 3 of them relative
    source = synthetic_episodes(2, 10, state_dim=6, action_dim=4, cameras=())
    root = write_lerobot_dataset(tmp_path / "wide", source, FPS, video=False)
    ds = load_lerobot(root, action_horizon=2, cameras=[], action_mode=["rel"] * 3 + ["abs"])
    frames = source[0]["frames"]
    s0, a = frames["observation.state"][4], frames["action"][4:6]
    expected = np.concatenate([a[:, :3] - s0[:3], a[:, 3:]], axis=1)
    np.testing.assert_allclose(ds[4]["actions"], expected, rtol=1e-6)
    vlm = tiny_vlm_dirs["qwen2_5_vl"]
    processor = VLAProcessor(AutoImageProcessor.from_pretrained(vlm), AutoTokenizer.from_pretrained(vlm),
                             action_dim=4, action_horizon=2, state_dim=6)  # fmt: skip
    stats = ds.compute_stats()
    processor.set_norm_stats("arm", {**stats, "action": {**stats["action"], "mode": ["identity"] * 4}})
    np.testing.assert_allclose(processor.decode_actions(ds[4]["actions"], "arm", state=s0), a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"needs a state value for each relative action dimension \(0\.\.3\): state "
                                         r"'observation\.state' has dim 3, action 'action' has dim 4"):
        load_lerobot(write_lerobot_dataset(tmp_path / "narrow", synthetic_episodes(1, 4, state_dim=3, action_dim=4,
                     cameras=()), FPS, video=False), action_mode=["abs", "abs", "abs", "rel"])  # fmt: skip


def test_one_statistics_key_needs_datasets_of_one_width(roots):
    with pytest.raises(ValueError, match=r"datasets of one statistics key have different \(action, state\) widths"):
        compute_union_stats([load_lerobot(roots["v3"], cameras=[]), load_lerobot(roots["image"], cameras=[])])


def test_union_statistics_are_those_of_every_datasets_values(roots, episodes, tmp_path):
    from hf_vla.data.lerobot import compute_union_stats

    other = synthetic_episodes(num_episodes=2, length=5, cameras=(), seed=1)  # 5 and 6 frames, other values
    second = write_lerobot_dataset(tmp_path / "other", other, FPS, video=False)
    both = [*episodes, *other]
    states = all_frames(both, "observation.state")
    expected = {"abs": all_frames(both, "action"),  # delta, horizon 2: a_t - s_t, and a_{t+1} - a_t inside episodes
                "delta": np.concatenate([ep["frames"]["action"] - ep["frames"]["observation.state"] for ep in both]
                                        + [np.diff(ep["frames"]["action"], axis=0) for ep in both])}  # fmt: skip
    for mode, actions in expected.items():
        datasets = [load_lerobot(root, action_horizon=2, cameras=[], action_mode=mode) for root in (roots["v3"], second)]
        union = compute_union_stats(datasets, action_mode="min_max", state_mode="mean_std")
        assert (union["num_transitions"], union["num_trajectories"], union["action_mode"]) == (39 + 11, 5, mode)
        for name, value in (("mean", actions.mean(0)), ("min", actions.min(0)), ("max", actions.max(0)),
                            ("q99", np.quantile(actions, 0.99, axis=0))):  # fmt: skip
            np.testing.assert_allclose(union["action"][name], value, rtol=1e-5, atol=1e-6, err_msg=f"{mode} {name}")
        np.testing.assert_allclose(union["state"]["mean"], states.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(union["state"]["std"], states.std(0), rtol=1e-5, atol=1e-6)


def test_delta_and_rel_need_a_state_of_action_dim(roots):
    with pytest.raises(ValueError, match=r"state 'observation.state' has dim 3, action 'action' has dim 4"):
        load_lerobot(roots["image"], action_mode="delta")
    with pytest.raises(ValueError, match=r"needs a state.*action 'action' dim 4"):
        load_lerobot(roots["v3"], action_mode="rel", state_key=None)


def test_action_horizon_must_be_a_positive_integer(roots):
    for horizon in (2.5, True, 0):
        with pytest.raises(ValueError, match=rf"action_horizon: expected a positive integer, got {horizon}"):
            load_lerobot(roots["v3"], action_horizon=horizon)


@pytest.mark.parametrize("name", ["v3", "v2.1", "v3_split", "v3_av1"])
def test_decoded_frames_match_their_episode_and_frame(roots, name):
    ds = load_lerobot(roots[name], action_horizon=1)
    for row in range(len(ds)):  # includes frames of the 2nd and 3rd episode of a concatenated v3 video
        sample = ds[row]
        episode, frame = sample["episode_index"], sample["frame_index"]
        for camera, key in enumerate((FRONT, WRIST)):
            image = sample["images"][key]
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert abs(image.mean() - pixel_value(episode, frame, camera)) < H264_TOLERANCE, (name, row, key)


def moving_texture_episodes(lengths, size=32):
    """Camera frames with mean `pixel_value(e, f)` under a zero-mean texture that moves 3 pixels per frame: encoders
    make P (and, with h264, B) frames of them, where flat frames come out as keyframes only at gop 2."""
    texture = np.random.default_rng(0).integers(-12, 13, size=(size, 2 * size))
    texture -= np.round(texture.mean()).astype(texture.dtype)
    episodes = []
    for e, n in enumerate(lengths):
        views = [np.roll(texture, 3 * f, axis=1)[:, :size] + pixel_value(e, f) for f in range(n)]
        camera = np.repeat(np.stack(views)[..., None], 3, axis=-1).astype(np.uint8)
        actions = np.stack([np.full(n, e), np.arange(n)], axis=1).astype(np.float32)
        episodes.append({"task": f"task {e}", "frames": {FRONT: camera, "action": actions}})
    return episodes


@pytest.mark.parametrize("codec, fps, gop", [("h264", 15, 12), ("h264", 50, 48), ("av1", 30, 12)])
def test_random_access_decodes_inter_frames_of_shared_and_rolled_over_files(tmp_path, codec, fps, gop):
    source = moving_texture_episodes([20, 23, 21, 22])
    root = write_lerobot_dataset(tmp_path / "moving", source, fps, codec=codec, gop=gop, crf=18, episodes_per_file=3)
    seeking, preloaded = load_lerobot(root), load_lerobot(root, decoder="preload")
    assert sorted({episode["videos"][FRONT][0] for episode in seeking.episodes.values()})[-1].endswith("file-001.mp4")
    rows = np.random.default_rng(fps).permutation(len(seeking))
    for row in [*rows, *range(len(seeking) - 1, len(seeking) - 30, -3), 5, 5, 60, 60]:  # shuffled, backwards, repeated
        sample = seeking[row]
        image, episode, frame = sample["images"][FRONT], sample["episode_index"], sample["frame_index"]
        np.testing.assert_array_equal(image, preloaded[row]["images"][FRONT], err_msg=f"row {row}")
        assert abs(image.mean() - source[episode]["frames"][FRONT][frame].mean()) < 1.5, (row, episode, frame)
    path, offset = seeking.episodes[1]["videos"][FRONT]  # the independent decoder, one seek per frame
    expected = np.stack([preloaded[row_of(source, 1, frame)]["images"][FRONT] for frame in (0, 11, 22)])
    np.testing.assert_array_equal(decode_frames_naively(root / path, offset + np.array([0, 11, 22]) / fps), expected)


def test_v3_v21_and_image_layouts_read_the_same_samples(tmp_path):
    source = moving_texture_episodes([9, 12, 10])
    layouts = {"image": dict(video=False), "v3": dict(episodes_per_file=2), "v2.1": dict(version="v2.1")}
    datasets = {name: load_lerobot(write_lerobot_dataset(tmp_path / name, source, FPS, crf=18, **kwargs),
                                   action_horizon=3) for name, kwargs in layouts.items()}
    for row in np.random.default_rng(0).permutation(31):
        samples = {name: ds[row] for name, ds in datasets.items()}
        episode, frame = samples["image"]["episode_index"], samples["image"]["frame_index"]
        recorded = source[episode]["frames"][FRONT]
        np.testing.assert_array_equal(samples["image"]["images"][FRONT], recorded[frame])
        for name in ("v3", "v2.1"):
            sample = samples[name]
            assert (sample["episode_index"], sample["frame_index"]) == (episode, frame)
            assert sample["instruction"] == f"task {episode}"
            np.testing.assert_array_equal(sample["actions"], samples["image"]["actions"])
            np.testing.assert_array_equal(sample["action_mask"], samples["image"]["action_mask"])
            errors = np.abs(recorded.astype(np.int16) - sample["images"][FRONT]).mean(axis=(1, 2, 3))
            assert errors.argmin() == frame and errors[frame] < 2, (name, row, errors.round(1))


def flat_episode(episode, length, size=16):
    values = np.array([pixel_value(episode, frame) for frame in range(length)], np.uint8)
    views = np.repeat(values, size * size * 3).reshape(length, size, size, 3)
    return {"task": f"task {episode}", "frames": {FRONT: views, "action": np.zeros((length, 1), np.float32)}}


def test_a_long_episode_after_another_gets_its_frames_at_float32_timestamps(tmp_path):
    fps, lengths = 3, [7, 12300]  # t reaches 4100 s, where float32 is off by up to 2.4e-4 s (LeRobot's tolerance: 1e-4)
    root = write_lerobot_dataset(tmp_path / "long", [flat_episode(e, n) for e, n in enumerate(lengths)], fps, gop=10)
    timestamps = pq.read_table(root / "data/chunk-000/file-000.parquet").column("timestamp")
    assert timestamps.type == pa.float32()
    assert np.abs(timestamps.to_numpy()[lengths[0]:] - np.arange(lengths[1]) / fps).max() > 1e-4
    ds = load_lerobot(root)
    rows = [*range(len(ds) - 200, len(ds)), *np.random.default_rng(0).integers(0, len(ds), 150)]
    for row in rows:  # reading on to the end of the file, then seeking
        sample = ds[row]
        expected = pixel_value(sample["episode_index"], sample["frame_index"])
        assert abs(sample["images"][FRONT].mean() - expected) < H264_TOLERANCE, (row, sample["frame_index"])


def test_image_mode_is_exact(roots):
    source = synthetic_episodes(3, 12, state_dim=3, cameras=("front",))
    for name in ("image", "image_v2.1"):
        ds = load_lerobot(roots[name], cameras=[FRONT], camera_rename={FRONT: "primary"})
        assert np.array_equal(ds[30]["images"]["primary"], source[2]["frames"][FRONT][5])


def test_camera_selection_order_and_rename(roots):
    ds = load_lerobot(roots["v3"], cameras=[WRIST, FRONT], camera_rename={FRONT: "primary"})
    assert list(ds[0]["images"]) == [WRIST, "primary"]
    assert list(load_lerobot(roots["v3"])[0]["images"]) == [FRONT, WRIST]
    with pytest.raises(ValueError, match=r"unknown camera\(s\) \['observation.images.top'\].*" + WRIST):
        load_lerobot(roots["v3"], cameras=["observation.images.top"])
    for name in (None, "", 3):  # the view would be named None / "" / 3
        with pytest.raises(ValueError, match=rf"camera_rename: expected a non-empty string name for each camera, got "
                                             rf"\{{'{FRONT}': {name!r}\}}"):
            load_lerobot(roots["v3"], camera_rename={FRONT: name})


def test_depth_cameras_are_left_out(roots, tmp_path):
    """LeRobot marks depth streams in the feature's info; RGB decoding would turn their values into noise."""
    root = shutil.copytree(roots["v3"], tmp_path / "depth")
    info = json.loads((root / "meta/info.json").read_text())
    info["features"][WRIST]["info"]["video.is_depth_map"] = True
    (root / "meta/info.json").write_text(json.dumps(info))
    assert list(load_lerobot(root)[0]["images"]) == [FRONT]
    with pytest.raises(ValueError, match=rf"depth camera\(s\) \['{WRIST}'\] .* not supported; RGB cameras: \['{FRONT}'\]"):
        load_lerobot(root, cameras=[WRIST])


def test_stats_match_numpy(roots, episodes):
    ds = load_lerobot(roots["v3"], action_horizon=2, cameras=[])
    stats = ds.compute_stats(action_mode="min_max", state_mode="mean_std")
    actions, states = all_frames(episodes, "action"), all_frames(episodes, "observation.state")
    assert stats["num_transitions"] == 39 and stats["num_trajectories"] == 3
    assert stats["action"]["mode"] == ["min_max"] * 4 and stats["state"]["mode"] == ["mean_std"] * 4
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["state"]["std"], states.std(0), rtol=1e-5)
    np.testing.assert_allclose(stats["state"]["min"], states.min(0))
    # delta statistics cover every valid chunk step: each frame's a_t - s_t plus a_{t+1} - a_t inside the episode
    delta = load_lerobot(roots["v3"], action_horizon=2, cameras=[], action_mode="delta").compute_stats()
    expected = [ep["frames"]["action"] - ep["frames"]["observation.state"] for ep in episodes]
    expected += [np.diff(ep["frames"]["action"], axis=0) for ep in episodes]
    expected = np.concatenate(expected)
    np.testing.assert_allclose(delta["action"]["mean"], expected.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta["action"]["max"], expected.max(0), rtol=1e-6)
    assert (stats["action_mode"], delta["action_mode"]) == ("abs", "delta")  # what decoding must invert


def test_corrupt_or_missing_video_names_the_file(roots, tmp_path):
    root = shutil.copytree(roots["v3"], tmp_path / "corrupt")
    video = root / f"videos/{FRONT}/chunk-000/file-000.mp4"
    video.write_bytes(b"this is not an mp4 file" * 50)
    ds = load_lerobot(root, cameras=[FRONT])
    with pytest.raises(VideoDecodeError, match=str(video)):
        ds[0]
    video.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 video file\(s\) of .* missing, e.g. \['{video}'\]"):
        load_lerobot(root, cameras=[FRONT])  # at load time, not at the first sample of that file
    assert len(load_lerobot(root, cameras=[])) == len(ds)  # a camera not read needs no video


def test_a_video_at_another_frame_rate_is_read_by_time_and_a_missing_frame_names_its_sample(roots, episodes, tmp_path):
    from hf_vla.data.lerobot_writer import VideoFileWriter

    recorded = all_frames(episodes, FRONT)  # the three episodes of the one v3 file, at 10 fps
    for name, fps, frames in (("slower", FPS // 2, recorded[::2]), ("faster", FPS * 2, recorded.repeat(2, axis=0))):
        root = shutil.copytree(roots["v3"], tmp_path / name)
        video = root / f"videos/{FRONT}/chunk-000/file-000.mp4"
        writer = VideoFileWriter(video, fps, "h264", gop=2, crf=23)
        writer.write(frames)
        writer.close()
        ds = load_lerobot(root, cameras=[FRONT])
        for row in range(len(ds)):
            if name == "slower" and row % 2:  # a time the 5 fps video has no frame for
                episode = next(e for e in range(3) if row < row_of(episodes, e + 1, 0))
                frame = row - row_of(episodes, episode, 0)
                offset = row_of(episodes, episode, 0) / FPS
                with pytest.raises(VideoDecodeError, match=rf"{video}: no frame within .* \(camera '{FRONT}' of "
                                                           rf"episode {episode} frame {frame}, whose episode starts "
                                                           rf"{offset:.4f}s into the file\)"):
                    ds[row]
                continue
            sample = ds[row]
            expected = pixel_value(sample["episode_index"], sample["frame_index"])
            assert abs(sample["images"][FRONT].mean() - expected) < H264_TOLERANCE, (name, row)


@pytest.mark.parametrize("decoder", ["pyav", "preload"])
def test_a_truncated_video_gives_no_wrong_frame_and_names_file_and_sample(roots, tmp_path, decoder):
    root = shutil.copytree(roots["v3"], tmp_path / "truncated")
    video = root / f"videos/{FRONT}/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size * 9 // 10])  # as a download cut short leaves it
    ds = load_lerobot(root, cameras=[FRONT], decoder=decoder)
    with pytest.raises(VideoDecodeError, match=rf"{video}.* \(camera '{FRONT}' of episode 2 frame 13, "):
        ds[len(ds) - 1]
    read = 0
    for row in np.random.default_rng(0).permutation(len(ds)):  # every frame is either its own or refused
        try:
            image = ds[row]["images"][FRONT]
        except VideoDecodeError as err:
            sample = f"episode {ds._episode_index[row]} frame {ds._frame_index[row]},"
            assert str(video) in str(err) and sample in str(err)
            continue
        assert abs(image.mean() - pixel_value(ds._episode_index[row], ds._frame_index[row])) < H264_TOLERANCE, row
        read += 1
    assert read >= 20  # the frames before the cut


def test_missing_parquet_names_the_file(roots, tmp_path):
    root = shutil.copytree(roots["v2.1"], tmp_path / "missing")
    data = root / "data/chunk-000/episode_000001.parquet"
    data.unlink()
    with pytest.raises(FileNotFoundError, match=str(data)):
        load_lerobot(root)


def _rewrite_data(root, edit):
    path = root / "data/chunk-000/file-000.parquet"
    pq.write_table(edit(pq.read_table(path)), path)
    return path


def _set_column(table, key, values):
    kind = table.schema.field(key).type
    if pa.types.is_fixed_size_list(kind):  # variable-length lists, as other writers store them
        kind = pa.list_(kind.value_type)
    return table.set_column(table.column_names.index(key), key, pa.array(values, type=kind))


def test_malformed_columns_are_refused_naming_file_and_column(roots, tmp_path):
    def ragged(table):  # same total count as 4-wide rows: a reshape alone would not notice
        rows = table.column("action").to_pylist()
        rows[0], rows[1] = rows[0][:3], rows[1] + rows[0][3:]
        return _set_column(table, "action", rows)

    def narrow(table):
        return _set_column(table, "action", [row[:3] for row in table.column("action").to_pylist()])

    def null_scalar(table):
        return _set_column(table, "timestamp", [None] + table.column("timestamp").to_pylist()[1:])

    def null_value(table):
        rows = table.column("observation.state").to_pylist()
        rows[5] = [None] * len(rows[5])
        return _set_column(table, "observation.state", rows)

    cases = [(ragged, r"column 'action' has rows of different lengths \[3, 4, 5\]"),
             (narrow, r"column 'action' has rows of 3 values, info.json's shape says 4"),
             (null_scalar, r"column 'timestamp' has null rows"),
             (null_value, r"column 'observation.state' has null values")]
    for edit, message in cases:
        root = shutil.copytree(roots["v3"], tmp_path / edit.__name__)
        path = _rewrite_data(root, edit)
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            load_lerobot(root)


def test_malformed_metadata_and_arguments_are_named(roots, tmp_path):
    import json

    root = shutil.copytree(roots["v3"], tmp_path / "meta")
    with pytest.raises(ValueError, match=r"state_key 'observation.states' is not a feature of .*; available: \["):
        load_lerobot(root, state_key="observation.states")  # a typo must not train without state
    assert "state" not in load_lerobot(root, state_key=None, cameras=[])[0]
    assert load_lerobot(root, cameras=FRONT).camera_names == [FRONT]  # one camera as a string
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k != "fps"}))
    with pytest.raises(ValueError, match=r"meta/info.json: missing key\(s\) \['fps'\]"):
        load_lerobot(root)
    info_path.write_text(json.dumps({**info, "video_path": None}))
    with pytest.raises(ValueError, match=r"meta/info.json: video features but no 'video_path' template"):
        load_lerobot(root)
    info_path.write_text(json.dumps(info))
    episodes = next((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    pq.write_table(pq.read_table(episodes).drop_columns([f"videos/{FRONT}/from_timestamp"]), episodes)
    with pytest.raises(ValueError, match=rf"{episodes}: missing column\(s\) \['videos/{FRONT}/from_timestamp'\]"):
        load_lerobot(root)
    root = shutil.copytree(roots["v3"], tmp_path / "tasks")
    _rewrite_data(root, lambda t: _set_column(t, "task_index", [7] * t.num_rows))
    with pytest.raises(ValueError, match=r"task_index \[7\] of the data files not in the task list"):
        load_lerobot(root)


def test_non_finite_actions_or_states_are_refused_at_load_naming_file_column_and_frame(roots, tmp_path):
    def put(key, row, dim, value, kind=None):
        def edit(table):
            rows = table.column(key).to_pylist()
            rows[row][dim] = value
            if kind is None:
                return _set_column(table, key, rows)
            return table.set_column(table.column_names.index(key), key, pa.array(rows, type=kind))
        return edit

    # v3_split: episodes 0 and 1 in file-000 (13 rows from row 12 on for episode 1), episode 2 in file-001
    cases = [("file-001", put("action", 5, 1, float("nan")), r"column 'action': expected finite values, got nan in "
                                                             r"dimension 1 at episode 2 frame 5"),
             ("file-000", put("observation.state", 12 + 4, 2, float("-inf")),
              r"column 'observation.state': expected finite values, got -inf in dimension 2 at episode 1 frame 4"),
             ("file-000", put("action", 3, 0, 1e39, pa.list_(pa.float64())),  # float32 would hold it as inf
              r"column 'action': expected finite values, got 1e\+39 \(beyond float32's range\) in dimension 0 at "
              r"episode 0 frame 3")]
    for i, (file, edit, message) in enumerate(cases):
        root = shutil.copytree(roots["v3_split"], tmp_path / str(i))
        path = root / f"data/chunk-000/{file}.parquet"
        pq.write_table(edit(pq.read_table(path)), path)
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            load_lerobot(root)


def test_a_2d_feature_stored_as_nested_lists_reads_row_by_row(roots, episodes, tmp_path):
    root = shutil.copytree(roots["v3"], tmp_path / "nested")
    nested = pa.list_(pa.list_(pa.float32()))
    _rewrite_data(root, lambda table: table.set_column(
        table.column_names.index("action"), "action",
        pa.array([[row[:2], row[2:]] for row in table.column("action").to_pylist()], type=nested)))
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["shape"] = [2, 2]
    (root / "meta/info.json").write_text(json.dumps(info))
    ds = load_lerobot(root)
    np.testing.assert_array_equal(ds[row_of(episodes, 1, 3)]["actions"][0], episodes[1]["frames"]["action"][3])


def test_an_episode_without_rows_is_refused(roots, tmp_path):
    root = shutil.copytree(roots["v3"], tmp_path / "missing_episode")
    _rewrite_data(root, lambda table: table.filter(pc.not_equal(table.column("episode_index"), 1)))
    with pytest.raises(ValueError, match=r"episode\(s\) \[1\] listed in the episode metadata have no rows"):
        load_lerobot(root)


def test_rows_out_of_frame_order_or_duplicated_frames_are_refused(roots, episodes, tmp_path):
    """A sample's action chunk is the rows after its own: rows out of frame order would give wrong chunks."""
    second = row_of(episodes, 1, 0)  # episode 1 shares its file with episodes 0 and 2; its frame_index starts at 0

    def swapped(table):
        rows = list(range(table.num_rows))
        rows[second], rows[second + 3] = rows[second + 3], rows[second]
        return table.take(pa.array(rows))

    def duplicated(table):
        frames = table.column("frame_index").to_pylist()
        frames[second + 2] = 1
        return _set_column(table, "frame_index", frames)

    def shifted(table):  # consecutive frames from 1, as some converted datasets number them: accepted
        frames = table.column("frame_index").to_pylist()
        episode = table.column("episode_index").to_pylist()
        return _set_column(table, "frame_index", [f + (e == 1) for f, e in zip(frames, episode)])

    for edit, got in [(swapped, "expected consecutive frames 3..15 in row order, got 1 at the episode's row 1"),
                      (duplicated, "expected consecutive frames 0..12 in row order, got 1 at the episode's row 2")]:
        root = shutil.copytree(roots["v3"], tmp_path / edit.__name__)
        path = _rewrite_data(root, edit)
        with pytest.raises(ValueError, match=rf"{path}: episode 1: frame_index: {got}"):
            load_lerobot(root)
    assert [load_lerobot(roots[name])[second]["frame_index"] for name in ("v3", "v3_split", "v2.1")] == [0, 0, 0]
    root = shutil.copytree(roots["v3"], tmp_path / "shifted")
    _rewrite_data(root, shifted)
    original, renumbered = load_lerobot(roots["v3"]), load_lerobot(root)
    assert renumbered[second]["frame_index"] == 1
    np.testing.assert_array_equal(renumbered[second]["actions"], original[second]["actions"])


def test_decoder_seeks_once_per_call_and_not_at_all_when_reading_on(roots):
    video = roots["v3"] / f"videos/{FRONT}/chunk-000/file-000.mp4"
    timestamps = [1.5, 1.2, 1.9, 1.3]  # unsorted on purpose; returned in this order
    decoder = PyAVDecoder()
    frames = decoder.decode(video, timestamps)
    assert decoder.seeks == 1
    assert np.array_equal(frames, decode_frames_naively(video, timestamps))
    for t in (2.0, 2.1, 2.2, 2.3):
        decoder.decode(video, [t])
    assert decoder.seeks == 1
    decoder.decode(video, [0.1])  # backwards: needs a seek
    assert decoder.seeks == 2


def test_a_tolerance_wider_than_half_a_frame_still_gives_the_nearest_frame(roots):
    # regression: the seeking decoder returned the first frame within tolerance_s, an earlier neighbour of the exact one
    from hf_vla.data import PreloadedDecoder

    video = roots["v3"] / f"videos/{FRONT}/chunk-000/file-000.mp4"
    calls = [[1.0, 0.5], [0.52], [0.48], [0.58], [2.3], [2.21], [3.0, 3.8, 3.92]]  # on, behind, ahead; a seek; the end
    for decoder in (PyAVDecoder(tolerance_s=0.25), PreloadedDecoder(tolerance_s=0.25)):
        for timestamps in calls:
            nearest = np.minimum(np.round(np.array(timestamps) * FPS) / FPS, 3.8)  # 39 frames: the last is at 3.8 s
            np.testing.assert_array_equal(decoder.decode(video, timestamps), decode_frames_naively(video, nearest),
                                          err_msg=f"{type(decoder).__name__} at {timestamps}")
        with pytest.raises(VideoDecodeError, match=r"t=4\.2000s"):
            decoder.decode(video, [4.2])  # the last frame, at 3.8 s, is 0.4 s away
    exact = PyAVDecoder(tolerance_s=1e-4)  # LeRobot's tolerance: float32 timestamps are closer than that
    frames = exact.decode(video, np.arange(39, dtype=np.float32) / np.float32(FPS))
    np.testing.assert_array_equal(frames, decode_frames_naively(video, np.arange(39) / FPS))


def test_reading_more_files_than_max_open_files_closes_and_reopens_them(roots):
    decoder = PyAVDecoder(max_open_files=1)
    ds = load_lerobot(roots["v3_split"], decoder=decoder)  # 2 cameras x 2 files, read in turn by every sample
    for row in np.random.default_rng(0).permutation(len(ds))[:20]:
        sample = ds[row]
        for camera, key in enumerate((FRONT, WRIST)):
            expected = pixel_value(sample["episode_index"], sample["frame_index"], camera)
            assert abs(sample["images"][key].mean() - expected) < H264_TOLERANCE, (row, key)
    assert list(decoder._open) == [str(roots["v3_split"] / ds.episodes[sample["episode_index"]]["videos"][WRIST][0])]
    for bad in (0, -1, 1.5, True):  # 0 used to close the container it had just opened, then fail reading it
        with pytest.raises(ValueError, match=rf"max_open_files: expected an integer ≥ 1, got {bad}"):
            PyAVDecoder(max_open_files=bad)


def test_custom_decoder_is_used(roots):
    calls = []

    def fake_decoder(path, timestamps):
        calls.append((str(path), list(timestamps)))
        return np.zeros((len(timestamps), 8, 8, 3), dtype=np.uint8)

    sample = load_lerobot(roots["v3"], cameras=[FRONT], decoder=fake_decoder)[13]
    assert sample["images"][FRONT].shape == (8, 8, 3)
    assert calls[0][0].endswith(f"{FRONT}/chunk-000/file-000.mp4") and calls[0][1] == pytest.approx([1.3])


def test_without_images_reads_the_same_samples_and_decodes_nothing(roots):
    calls = []

    def fake_decoder(path, timestamps):
        calls.append(str(path))
        return np.zeros((len(timestamps), 8, 8, 3), dtype=np.uint8)

    ds = load_lerobot(roots["v3"], action_horizon=3, cameras=[FRONT], action_mode="rel", decoder=fake_decoder)
    bare = ds.without_images()
    for index in (0, 13, len(ds) - 1):
        full, light = ds[index], bare[index]
        assert light["images"] == {} and full["images"][FRONT].shape == (8, 8, 3)
        assert light.keys() == full.keys()
        for key in ("actions", "state", "action_mask"):
            np.testing.assert_array_equal(light[key], full[key])
        assert [light[k] for k in ("instruction", "episode_index", "frame_index")] == [
            full[k] for k in ("instruction", "episode_index", "frame_index")]
    assert len(calls) == 3 and ds.camera_names == [FRONT] and bare.camera_names == []  # the original keeps its views


def test_streaming_writer_matches_episode_writer(tmp_path, episodes):
    with LeRobotWriter(tmp_path / "streamed", FPS, video=False) as writer:
        for episode in episodes[:2]:
            for i in range(len(episode["frames"]["action"])):
                writer.add_frame({key: value[i] for key, value in episode["frames"].items()}, episode["task"])
            writer.save_episode()
    ds = load_lerobot(tmp_path / "streamed", action_horizon=2)
    assert len(ds) == 25 and ds[20]["instruction"] == "task number 1"
    assert np.array_equal(ds[20]["images"][WRIST], episodes[1]["frames"][WRIST][8])


def test_writer_refuses_a_dtype_or_keys_that_would_lose_values(tmp_path):
    state = np.zeros((2, 2), np.float32)
    writer = LeRobotWriter(tmp_path / "dtype", FPS, video=False)
    writer.add_episode({"observation.state": state, "action": np.array([[0, 1], [1, 0]])}, "t")
    with pytest.raises(ValueError, match=r"'action' is stored as int64 \(set by the first episode\), got float64"):
        writer.add_episode({"observation.state": state, "action": np.array([[0.7, -0.3], [1.9, 0.5]])}, "t")
    writer.add_episode({"observation.state": np.ones((2, 2), np.int64), "action": np.ones((2, 2), np.uint8)}, "t")
    writer.add_episode({"observation.state": state.astype(np.float64), "action": np.ones((2, 2), bool)}, "t")
    flags = LeRobotWriter(tmp_path / "flags", FPS, video=False)
    flags.add_episode({"action": np.zeros((2, 2), bool)}, "t")
    with pytest.raises(ValueError, match=r"'action' is stored as bool \(set by the first episode\), got int64"):
        flags.add_episode({"action": np.ones((2, 2), np.int64)}, "t")

    writer = LeRobotWriter(tmp_path / "keys", FPS, video=False)
    writer.add_frame({"action": np.zeros(2, np.float32)}, "t")
    writer.add_frame({"action": np.ones(2, np.float32), "observation.state": np.ones(2, np.float32)}, "t")
    with pytest.raises(ValueError, match=r"frame 1 has keys \['action', 'observation.state'\], frame 0 has \['action'\]"):
        writer.save_episode()


def test_writer_refuses_video_settings_the_encoder_would_change_or_choke_on(tmp_path):
    for kwargs, message in [(dict(fps=29.97), r"fps: expected an integer ≥ 1, got 29.97"),
                            (dict(fps=0), r"fps: expected an integer ≥ 1, got 0"),
                            (dict(gop=0), r"gop: expected an integer ≥ 1, got 0"),
                            (dict(crf=99), r"crf: expected an integer in \[0, 51\] for h264, got 99"),
                            (dict(codec="av1", crf=64), r"crf: expected an integer in \[0, 63\] for av1, got 64"),
                            (dict(episodes_per_file=2.5), r"episodes_per_file: expected an integer ≥ 1 or None, got 2.5"),
                            (dict(episodes_per_file=-1), r"episodes_per_file: expected an integer ≥ 1 or None, got -1")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            LeRobotWriter(tmp_path / "w", **{"fps": FPS, **kwargs})
    frames = {"action": np.zeros((2, 2), np.float32), FRONT: np.zeros((2, 33, 32, 3), np.uint8)}
    with pytest.raises(ValueError, match=rf"camera '{FRONT}': h264 \(yuv420p\) needs an even height and width, got 33x32"):
        with LeRobotWriter(tmp_path / "odd", FPS) as writer:
            writer.add_episode(frames, "t")
    with LeRobotWriter(tmp_path / "odd_av1", FPS, codec="av1") as writer:  # av1 takes odd sides
        writer.add_episode(frames, "t")
    assert load_lerobot(tmp_path / "odd_av1")[1]["images"][FRONT].shape == (33, 32, 3)


def test_torch_dataloader_iterates(roots):
    ds = load_lerobot(roots["v3"], action_horizon=4, camera_rename={FRONT: "primary"})
    batches = list(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0))
    assert len(batches) == 5 and sum(len(b["instruction"]) for b in batches) == 39
    first = batches[0]
    assert first["images"]["primary"].shape == (8, 32, 32, 3) and first["images"]["primary"].dtype == torch.uint8
    assert first["actions"].shape == (8, 4, 4) and first["action_mask"].dtype == torch.bool
    assert first["episode_index"].tolist() == [0] * 8


def test_forked_workers_after_the_parent_decoded(roots):
    # regression: a worker freeing the container it inherited from the parent used to block forever in FFmpeg
    ds = load_lerobot(roots["v3"], cameras=[FRONT])
    parent_image = ds[20]["images"][FRONT]
    loader = torch.utils.data.DataLoader(ds, batch_size=13, num_workers=1, timeout=60,
                                         multiprocessing_context="fork")
    images = torch.cat([batch["images"][FRONT] for batch in loader])
    assert images.shape == (39, 32, 32, 3) and np.array_equal(images[20].numpy(), parent_image)


@pytest.mark.parametrize("decoder", ["pyav", "preload"])
def test_two_forked_workers_read_shuffled_samples_of_several_files(roots, decoder):
    ds = load_lerobot(roots["v3_split"], decoder=decoder)
    ds[30]  # the parent has a file open (or decoded) before the fork
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, timeout=60,
                                         multiprocessing_context="fork", generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        for camera, key in enumerate((FRONT, WRIST)):
            expected = [pixel_value(e, f, camera) for e, f in zip(batch["episode_index"], batch["frame_index"])]
            means = batch["images"][key].double().mean(dim=(1, 2, 3)).numpy()
            np.testing.assert_allclose(means, expected, atol=H264_TOLERANCE, err_msg=key)
        seen += list(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist()))
    assert sorted(seen) == sorted((ds[row]["episode_index"], ds[row]["frame_index"]) for row in range(len(ds)))


@pytest.mark.parametrize("name", ["v3", "v3_split", "v2.1"])
def test_preloaded_decoder_gives_the_same_frames_as_seeking(roots, name):
    from hf_vla.data import PreloadedDecoder

    seeking = load_lerobot(roots[name], action_horizon=2)
    preloaded = load_lerobot(roots[name], action_horizon=2, decoder="preload")
    assert isinstance(preloaded.decoder, PreloadedDecoder)
    for row in np.random.default_rng(0).permutation(len(seeking)):
        a, b = seeking[row], preloaded[row]
        for key in (FRONT, WRIST):
            np.testing.assert_array_equal(a["images"][key], b["images"][key])
        np.testing.assert_array_equal(a["actions"], b["actions"])
    path = next((roots[name] / "videos").rglob("*.mp4"))
    with pytest.raises(VideoDecodeError, match=r"no frame within .* of t=99\.0000s"):
        preloaded.decoder.decode(path, [99.0])
    for decoder in (preloaded.decoder, PyAVDecoder()):  # the preloaded one returned the last frame for both
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=rf"timestamps must be finite, got \[{bad}\]"):
                decoder.decode(path, [0.1, bad])
    with pytest.raises(ValueError, match=r"decoder: expected one of \['preload', 'pyav'\], got 'fast'"):
        load_lerobot(roots[name], decoder="fast")


def test_random_shift_moves_views_within_the_pad(roots):
    from hf_vla.data.augment import RandomShift, random_shift

    torch.manual_seed(0)
    image = np.zeros((16, 16, 3), np.uint8)
    image[8, 8] = 255
    moves = {tuple(np.argwhere(random_shift(image, 3)[..., 0] == 255)[0] - 8) for _ in range(200)}
    assert moves == {(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)}  # every offset, none beyond
    data = load_lerobot(roots["v3"], action_horizon=2)
    shifted = RandomShift(data, pad=2)
    sample, original = shifted[5], data[5]
    assert len(shifted) == len(data) and shifted.camera_names == data.camera_names
    np.testing.assert_array_equal(sample["actions"], original["actions"])
    for key, view in sample["images"].items():
        assert view.shape == original["images"][key].shape and view.dtype == np.uint8
    for pad in (-1, 2.5, True):  # a fraction would be truncated, 0.9 to no augmentation at all
        with pytest.raises(ValueError, match=f"pad: expected a non-negative number of pixels, got {pad}"):
            RandomShift(data, pad=pad)
    from hf_vla.data.augment import random_shift

    with pytest.raises(ValueError, match=r"image: expected channel-last \[H, W, C\], got shape \[3, 32, 32\]"):
        random_shift(np.zeros((3, 32, 32), np.uint8), 2)


def test_random_shift_gives_each_view_its_own_offsets_from_the_seeded_torch_generator():
    from hf_vla.data.augment import RandomShift

    height, width, pad = 12, 16, 3
    ramp = (np.arange(height)[:, None] * width + np.arange(width)).astype(np.uint8)  # every pixel tells where it was
    view = np.repeat(ramp[..., None], 3, axis=-1)
    padded = np.pad(view, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    windows = {(dy, dx): padded[dy : dy + height, dx : dx + width] for dy in range(2 * pad + 1)
               for dx in range(2 * pad + 1)}  # fmt: skip
    shifted = RandomShift([{"images": {"front": view, "wrist": view}, "instruction": "pick"}], pad=pad)

    def offsets(draws):
        found = []
        for _ in range(draws):
            sample = shifted[0]
            assert sample["instruction"] == "pick"
            for image in sample["images"].values():
                assert image.shape == view.shape and image.dtype == np.uint8
            # each view is one crop of the edge-padded view: no new values, nothing outside uint8
            found.append(tuple(next(offset for offset, window in windows.items() if np.array_equal(image, window))
                               for image in sample["images"].values()))  # fmt: skip
        return found

    torch.manual_seed(0)
    first = offsets(30)
    torch.manual_seed(0)
    assert offsets(30) == first
    assert sum(front != wrist for front, wrist in first) > 20  # drawn per view, not once per sample
    assert len(set(first)) > 20
