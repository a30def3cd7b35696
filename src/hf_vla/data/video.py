"""Video frame decoding for LeRobot datasets, pluggable.

A decoder is anything with `decode(path, timestamps) -> uint8 [N, H, W, 3]` (frames in the order of `timestamps`,
which are seconds into the file), or a plain callable with that signature. `PyAVDecoder` is the default:

* one open container per file per process, kept in a small LRU cache (a forked DataLoader worker notices the new
  pid and opens its own, so no FFmpeg state is shared across processes);
* the timestamps of one call are served by a single seek to the keyframe at or before the earliest one, then decoding
  forward; a later call that starts a little ahead of where the previous one stopped (sequential reading; "a little"
  is within the keyframe spacing, so decoding on costs no more than a seek would) continues without seeking at all;
* each timestamp gets the frame nearest to it, which must be within `tolerance_s` (default: half a frame period).

`PreloadedDecoder` decodes each file whole on first use and answers from memory, for datasets that fit in RAM.

Errors name the file: `FileNotFoundError` for a missing video, `VideoDecodeError` (a `RuntimeError`) for one that
cannot be opened or decoded, or that has no frame at a requested time.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


_INHERITED_CONTAINERS: list = []


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded, or lacks a frame at a requested timestamp."""


@runtime_checkable
class VideoDecoder(Protocol):
    def decode(self, path: str | os.PathLike, timestamps: Sequence[float]) -> np.ndarray: ...


class _OpenVideo:
    """One open container plus where its decoder currently stands, so that sequential reads need no seek."""

    def __init__(self, path: str, thread_count: int):
        import av
        from av.video.reformatter import VideoReformatter

        try:
            self.container = av.open(path)
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError) as err:
            raise VideoDecodeError(f"cannot open video file {path}: {err}") from err
        if thread_count != 1:  # frame threading adds latency after every seek, so it is opt-in
            self.stream.thread_type = "AUTO"
        self.stream.thread_count = thread_count
        self.path = path
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.frame_period = float(1 / rate) if rate else None
        self.reformatter = VideoReformatter()  # reused: a fresh colour converter per frame costs ~40% more
        self.frames = None  # live `container.decode` iterator, None until the first seek
        self.last_frame = None  # last frame pulled from `frames`
        self.last_time = None
        self.previous_frame = None  # the one pulled before it (the last frame of the stream once `frames` ended)
        self.previous_time = None
        self.last_keyframe_time = None
        self.keyframe_interval = 0.0  # largest keyframe spacing seen so far, in seconds

    def pull(self):
        """Next decoded frame (None at the end of the stream); tracks the keyframe spacing."""
        frame = next(self.frames, None)
        if self.last_frame is not None:
            self.previous_frame, self.previous_time = self.last_frame, self.last_time
        if frame is None:
            self.last_frame = self.last_time = None
            return None
        self.last_frame, self.last_time = frame, float(frame.time)
        if frame.key_frame:
            if self.last_keyframe_time is not None:
                self.keyframe_interval = max(self.keyframe_interval, self.last_time - self.last_keyframe_time)
            self.last_keyframe_time = self.last_time
        return frame

    def to_rgb(self, frame) -> np.ndarray:
        return self.reformatter.reformat(frame, format="rgb24").to_ndarray()

    def forget_frames(self):
        self.last_frame = self.last_time = self.previous_frame = self.previous_time = None

    def close(self):
        self.frames = None
        self.forget_frames()
        self.container.close()


class PyAVDecoder:
    """Decodes frames at given timestamps with PyAV, one seek per call at most (see the module docstring).

    Args:
        tolerance_s: largest allowed distance between a requested timestamp and the frame returned (the nearest one);
            by default half the stream's frame period (1e-4 s when the stream has no frame rate).
        max_forward_s: upper bound on how far ahead of the last decoded frame a call may start and still decode
            forward instead of seeking (it also has to be within the keyframe spacing seen so far).
        max_open_files: containers kept open per process.
        thread_count: FFmpeg decoding threads per container (1 suits DataLoader workers; 0 lets FFmpeg choose).
    """

    def __init__(
        self,
        tolerance_s: float | None = None,
        max_forward_s: float = 1.0,
        max_open_files: int = 16,
        thread_count: int = 1,
    ):
        if isinstance(max_open_files, bool) or not isinstance(max_open_files, int) or max_open_files < 1:
            # with none kept open, the container just opened was closed before it was read
            raise ValueError(f"max_open_files: expected an integer ≥ 1, got {max_open_files!r}")
        self.tolerance_s = tolerance_s
        self.max_forward_s = max_forward_s
        self.max_open_files = max_open_files
        self.thread_count = thread_count
        self._open: OrderedDict[str, _OpenVideo] = OrderedDict()
        self._pid = os.getpid()
        self.seeks = 0  # number of seeks issued by this process; the benchmark and tests read it

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __call__(self, path, timestamps):
        return self.decode(path, timestamps)

    def decode(self, path: str | os.PathLike, timestamps: Sequence[float]) -> np.ndarray:
        import av

        path = str(path)
        wanted = _checked_timestamps(path, timestamps)
        video = self._get(path)
        half_period = 0.5 * video.frame_period - 1e-6 if video.frame_period else None
        tolerance = self.tolerance_s
        if tolerance is None:
            tolerance = half_period or 1e-4
        # a frame this close is the nearest one (at a constant frame rate), so no later frame need be decoded to check
        nearest_within = tolerance if half_period is None else min(tolerance, half_period)
        order = np.argsort(wanted, kind="stable")
        out: list[np.ndarray | None] = [None] * wanted.size
        try:
            self._decode_sorted(video, wanted, order, tolerance, nearest_within, out)
        except av.FFmpegError as err:
            self._close(path)
            raise VideoDecodeError(f"error decoding video file {path}: {err}") from err
        return np.stack(out)

    def _decode_sorted(self, video: _OpenVideo, wanted, order, tolerance, nearest_within, out):
        first = wanted[order[0]]
        if not self._can_read_on(video, first, nearest_within):
            self._seek(video, first)
        for index in order:
            out[index] = video.to_rgb(self._nearest_frame(video, wanted[index], tolerance, nearest_within))

    def _nearest_frame(self, video: _OpenVideo, target: float, tolerance: float, nearest_within: float):
        """Decodes forward to the frame nearest `target`: one within `nearest_within` of it, else the last frame before
        it or the first after it, whichever is closer."""
        while video.last_frame is None or video.last_time < target:
            if video.last_frame is not None and target - video.last_time <= nearest_within:
                return video.last_frame
            if video.pull() is None:
                break
        candidates = [(abs(time - target), time, frame) for time, frame in
                      ((video.previous_time, video.previous_frame), (video.last_time, video.last_frame))
                      if frame is not None]  # fmt: skip
        if not candidates:
            raise VideoDecodeError(f"video file {video.path}: t={target:.4f}s is past the end of the stream")
        distance, time, frame = min(candidates, key=lambda candidate: candidate[0])
        if distance > tolerance and video.last_frame is None and target > time:
            raise VideoDecodeError(f"video file {video.path}: t={target:.4f}s is past the end of the stream (last "
                                   f"frame at {time:.4f}s)")
        if distance > tolerance:
            raise VideoDecodeError(f"video file {video.path}: no frame within {tolerance:.4f}s of t={target:.4f}s "
                                   f"(nearest decoded frame is at {time:.4f}s)")
        return frame

    def _can_read_on(self, video: _OpenVideo, first: float, nearest_within: float) -> bool:
        """Whether decoding forward from the current position beats seeking: the target is not behind us (no frame
        before the current one can be the nearest) and is closer than a keyframe interval (a seek would decode about
        as much) and than `max_forward_s`."""
        if video.last_time is None:
            return False
        ahead = first - video.last_time
        reach = min(self.max_forward_s, max(video.keyframe_interval, video.frame_period or 0.0))
        return -nearest_within <= ahead <= reach + nearest_within

    def _seek(self, video: _OpenVideo, seconds: float):
        offset = max(0.0, seconds) / float(video.stream.time_base)
        video.container.seek(int(offset), stream=video.stream, backward=True, any_frame=False)
        video.frames = video.container.decode(video.stream)
        video.forget_frames()
        video.last_keyframe_time = None
        self.seeks += 1

    def _get(self, path: str) -> _OpenVideo:
        if os.getpid() != self._pid:
            # A forked worker must not use the parent's containers, and must not free them either: FFmpeg's teardown
            # can block forever on locks copied from the parent. They stay referenced (unused) until the worker exits.
            _INHERITED_CONTAINERS.extend(self._open.values())
            self._open = OrderedDict()
            self._pid = os.getpid()
        video = self._open.get(path)
        if video is not None:
            self._open.move_to_end(path)
            return video
        if not Path(path).is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        video = _OpenVideo(path, self.thread_count)
        self._open[path] = video
        while len(self._open) > self.max_open_files:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return video

    def _close(self, path: str):
        video = self._open.pop(path, None)
        if video is not None:
            video.close()

    def close(self):
        for path in list(self._open):
            self._close(path)


class PreloadedDecoder:
    """Decodes each video file whole, once, and serves every later request from memory.

    For datasets that fit in RAM (e.g. generated simulator demonstrations: 20 k frames at 112² are 0.75 GB), random
    access during training then costs a lookup instead of a seek and a few decoded frames per sample.

    Args:
        tolerance_s: largest allowed distance between a requested timestamp and the frame returned; by default half
            the stream's frame period.
    """

    def __init__(self, tolerance_s: float | None = None):
        self.tolerance_s = tolerance_s
        self._files: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}

    def __call__(self, path, timestamps):
        return self.decode(path, timestamps)

    def decode(self, path: str | os.PathLike, timestamps: Sequence[float]) -> np.ndarray:
        path = str(path)
        wanted = _checked_timestamps(path, timestamps)
        if path not in self._files:
            self._files[path] = self._decode_file(path)
        times, frames, tolerance = self._files[path]
        nearest = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1)
        nearest -= (wanted - times[nearest - 1]) < (times[nearest] - wanted)
        missing = np.abs(times[nearest] - wanted) > tolerance
        if missing.any():
            t = float(wanted[missing][0])
            raise VideoDecodeError(f"video file {path}: no frame within {tolerance:.4f}s of t={t:.4f}s")
        return frames[nearest]

    def _decode_file(self, path: str) -> tuple[np.ndarray, np.ndarray, float]:
        import av

        if not Path(path).is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        video = _OpenVideo(path, thread_count=0)
        try:
            video.frames = video.container.decode(video.stream)
            times, frames = [], []
            while (frame := video.pull()) is not None:
                times.append(video.last_time)
                frames.append(video.to_rgb(frame))
        except av.FFmpegError as err:
            raise VideoDecodeError(f"error decoding video file {path}: {err}") from err
        finally:
            video.close()
        if not frames:
            raise VideoDecodeError(f"video file {path}: no frames")
        tolerance = self.tolerance_s
        if tolerance is None:
            tolerance = 0.5 * video.frame_period - 1e-6 if video.frame_period else 1e-4
        times = np.asarray(times + [np.inf])  # the sentinel keeps searchsorted in range for one-frame files
        return times, np.stack(frames + frames[-1:]), tolerance


def _checked_timestamps(path: str, timestamps: Sequence[float]) -> np.ndarray:
    wanted = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if wanted.size == 0:
        raise ValueError(f"decode({path}): no timestamps given")
    if not np.isfinite(wanted).all():
        raise ValueError(f"decode({path}): timestamps must be finite, got {wanted[~np.isfinite(wanted)][:3].tolist()}")
    return wanted


def decode_frames_naively(path: str | os.PathLike, timestamps: Sequence[float], container=None,
                          reformatter=None) -> np.ndarray:
    """Reference decoder: one seek per timestamp, then decode up to that frame (what `PyAVDecoder` avoids).

    Used by the benchmark and as an independent check in the tests. `container` reuses an open file; `reformatter`
    (an `av.video.reformatter.VideoReformatter`) reuses one colour converter instead of `frame.to_ndarray`'s fresh one.
    """
    import av

    own = container is None
    container = av.open(str(path)) if own else container
    stream = container.streams.video[0]
    tolerance = 0.5 * float(1 / stream.average_rate) - 1e-6 if stream.average_rate else 1e-4
    frames = []
    try:
        for t in timestamps:
            container.seek(int(max(0.0, t) / float(stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                if abs(float(frame.time) - t) <= tolerance:
                    rgb = reformatter.reformat(frame, format="rgb24") if reformatter else frame.reformat(format="rgb24")
                    frames.append(rgb.to_ndarray())
                    break
                if float(frame.time) > t + tolerance:
                    raise VideoDecodeError(f"video file {path}: no frame at t={t:.4f}s")
            else:
                raise VideoDecodeError(f"video file {path}: t={t:.4f}s is past the end of the stream")
    finally:
        if own:
            container.close()
    return np.stack(frames)


DECODERS = {"pyav": PyAVDecoder, "preload": PreloadedDecoder}


def as_decoder(decoder) -> VideoDecoder:
    """`None` → a new `PyAVDecoder`; a name in `DECODERS` → a new one; an object with `.decode` as is; a bare
    callable wrapped."""
    if decoder is None:
        return PyAVDecoder()
    if isinstance(decoder, str):
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {sorted(DECODERS)}, got {decoder!r}")
        return DECODERS[decoder]()
    if hasattr(decoder, "decode"):
        return decoder
    if callable(decoder):
        return _CallableDecoder(decoder)
    raise TypeError(f"decoder: expected an object with decode(path, timestamps) or a callable, got {type(decoder)}")


class _CallableDecoder:
    def __init__(self, fn):
        self.fn = fn

    def decode(self, path, timestamps):
        return np.asarray(self.fn(path, timestamps))


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Decode frames of a video at timestamps (no arguments: a synthetic "
                                                 "video).")
    parser.add_argument("video", nargs="?", help="an .mp4 file")
    parser.add_argument("timestamps", nargs="*", type=float, help="seconds")
    args = parser.parse_args()
    if args.video and not args.timestamps:
        parser.error("give at least one timestamp after the video")
    with tempfile.TemporaryDirectory() as scratch:
        if args.video:
            path, timestamps = args.video, args.timestamps
        else:  # frame f of a 10 fps synthetic video is filled with pixel_value(0, f)
            from .lerobot_writer import VideoFileWriter, pixel_value

            path, timestamps = f"{scratch}/synthetic.mp4", [0.0, 0.5, 1.1]
            writer = VideoFileWriter(Path(path), fps=10, codec="h264", gop=2, crf=23)
            writer.write(np.stack([np.full((32, 32, 3), pixel_value(0, f), np.uint8) for f in range(12)]))
            writer.close()
            print(f"synthetic video, frame f filled with {[pixel_value(0, round(t * 10)) for t in timestamps]} "
                  f"at {timestamps} s")
        decoded = PyAVDecoder().decode(path, timestamps)
        means = decoded.reshape(len(decoded), -1).mean(1).round(2)
        print(f"{decoded.shape} {decoded.dtype}; mean pixel per frame: {means}")
