"""Video decode throughput of the LeRobot loader vs naive per-frame seek-and-decode, and RSS per DataLoader worker.

Writes a synthetic v3.0 dataset (one mp4 holding every episode, as lerobot does) to a temp dir, then times, on the
same list of (file, timestamp) requests:
  loader      - `PyAVDecoder.decode(path, [t])`, exactly what `LeRobotDataset.__getitem__` calls per camera
  naive       - one seek per frame then decode up to it and `to_ndarray`, reusing one open container
  naive+conv  - the same, but reusing one colour converter as the loader does, so the ratio shows the seeks alone
for three access patterns: sequential frames (iterating an episode), 8-frame windows (one call per window), and
shuffled single frames (training with shuffle; neither can avoid a seek there, so expect ~1x).

    PYTHONPATH=src python benchmarks/lerobot_loader.py [--frames 600] [--size 128] [--gop 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_vla.data import PyAVDecoder, load_lerobot, write_lerobot_dataset
from hf_vla.data.video import decode_frames_naively


def synthetic_video_episodes(num_episodes: int, length: int, size: int, seed: int = 0) -> list[dict]:
    """Moving gradients plus noise: content that h264 has to work for, unlike flat frames."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    episodes = []
    for e in range(num_episodes):
        images = np.empty((length, size, size, 3), dtype=np.uint8)
        for f in range(length):
            base = (x + 2 * f + 40 * e) % 256
            images[f] = np.stack([base, (y + f) % 256, (x + y + 3 * f) % 256], axis=-1)
        images = np.clip(images + rng.integers(0, 12, images.shape), 0, 255).astype(np.uint8)
        state = rng.normal(size=(length, 7)).astype(np.float32)
        episodes.append({"task": f"task {e}", "frames": {"observation.images.front": images,
                                                          "observation.state": state,
                                                          "action": rng.normal(size=(length, 7)).astype(np.float32)}})
    return episodes


def requests_of(ds) -> list[tuple[Path, float]]:
    requests = []
    for row in range(len(ds)):
        path, offset = ds.episodes[int(ds._episode_index[row])]["videos"]["observation.images.front"]
        requests.append((ds.root / path, offset + float(ds._timestamp[row])))
    return requests


def time_loader(requests, window: int = 1) -> float:
    decoder = PyAVDecoder()
    decoder.decode(requests[0][0], [requests[0][1]])  # open the file outside the timing, as naive does
    start = time.perf_counter()
    for i in range(0, len(requests) - window + 1, window):
        decoder.decode(requests[i][0], [t for _, t in requests[i:i + window]])
    return (len(requests) // window * window) / (time.perf_counter() - start)


def time_naive(requests, window: int = 1, shared_converter: bool = False) -> float:
    import av
    from av.video.reformatter import VideoReformatter

    container = av.open(str(requests[0][0]))
    container.streams.video[0].thread_count = 1  # as PyAVDecoder's default, so only the access pattern differs
    reformatter = VideoReformatter() if shared_converter else None
    decode_frames_naively(requests[0][0], [requests[0][1]], container, reformatter)  # warm, as the loader is
    start = time.perf_counter()
    for i in range(0, len(requests) - window + 1, window):
        decode_frames_naively(requests[i][0], [t for _, t in requests[i:i + window]], container, reformatter)
    rate = (len(requests) // window * window) / (time.perf_counter() - start)
    container.close()
    return rate


def best_of(repeats: int, timers: dict) -> dict[str, float]:
    """Runs the timers interleaved `repeats` times (the machine may be shared) and keeps each one's best rate."""
    best = dict.fromkeys(timers, 0.0)
    for _ in range(repeats):
        for name, timer in timers.items():
            best[name] = max(best[name], timer())
    return best


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def private_mib() -> float:
    """Memory only this process holds (USS): RSS minus pages still shared with the parent after fork."""
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


class _RSSProbe(torch.utils.data.Dataset):
    """Wraps the dataset; samples report the worker's pid and (every 32nd) its memory."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        sample = self.ds[i]
        probe = i % 32 == 0  # reading smaps_rollup is slow enough to distort the throughput if done every sample
        return {"pid": os.getpid(), "rss_mib": rss_mib() if probe else 0.0,
                "private_mib": private_mib() if probe else 0.0, "image": sample["images"]["observation.images.front"]}


def worker_memory(ds, workers: int) -> dict[int, tuple[float, float]]:
    loader = torch.utils.data.DataLoader(_RSSProbe(ds), batch_size=16, shuffle=True, num_workers=workers)
    peak: dict[int, tuple[float, float]] = {}
    start = time.perf_counter()
    for batch in loader:
        for pid, rss, private in zip(batch["pid"].tolist(), batch["rss_mib"].tolist(), batch["private_mib"].tolist()):
            old = peak.get(pid, (0.0, 0.0))
            peak[pid] = (max(old[0], rss), max(old[1], private))
    print(f"DataLoader(num_workers={workers}, shuffle): {len(ds) / (time.perf_counter() - start):.0f} samples/s")
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=600, help="total frames over all episodes")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--gop", type=int, default=2, help="keyframe interval (lerobot writes 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lerobot_bench_") as tmp:
        run(Path(tmp) / "dataset", args)


def run(root: Path, args):
    start = time.perf_counter()
    episodes = synthetic_video_episodes(args.episodes, args.frames // args.episodes, args.size)
    write_lerobot_dataset(root, episodes, fps=30, gop=args.gop)
    del episodes
    print(f"dataset: {args.frames} frames {args.size}x{args.size}, h264 g={args.gop}, one mp4 for "
          f"{args.episodes} episodes; written in {time.perf_counter() - start:.1f}s")

    rss_before = rss_mib()
    ds = load_lerobot(root, action_horizon=8)
    requests = requests_of(ds)
    shuffled = [requests[i] for i in np.random.default_rng(0).permutation(len(requests))]

    print("frames/s, best of", args.repeats, "interleaved runs; naive = seek + decode per frame with one open file;")
    print("naive+conv also reuses one colour converter, isolating what skipping the seeks alone buys")
    print(f"{'pattern':<24}{'loader':>9}{'naive':>9}{'ratio':>8}{'naive+conv':>12}{'ratio':>8}")
    for name, reqs, window in (("sequential frames", requests, 1), ("8-frame windows", requests, 8),
                               ("shuffled single frames", shuffled, 1)):
        rates = best_of(args.repeats, {
            "loader": lambda: time_loader(reqs, window),
            "naive": lambda: time_naive(reqs, window),
            "naive+conv": lambda: time_naive(reqs, window, shared_converter=True),
        })
        fast = rates["loader"]
        print(f"{name:<24}{fast:>9.0f}{rates['naive']:>9.0f}{fast / rates['naive']:>7.2f}x"
              f"{rates['naive+conv']:>12.0f}{fast / rates['naive+conv']:>7.2f}x")

    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    print(f"dataset[i] sequential, full samples: {len(ds) / (time.perf_counter() - start):.0f} samples/s")
    print(f"main process RSS: {rss_before:.0f} MiB before opening the dataset (torch, transformers, PyAV loaded), "
          f"{rss_mib():.0f} MiB after iterating it")
    for pid, (rss, private) in worker_memory(ds, args.workers).items():
        print(f"  worker pid {pid}: peak RSS {rss:.0f} MiB, of which private (not shared with the parent) "
              f"{private:.0f} MiB")


if __name__ == "__main__":
    main()
