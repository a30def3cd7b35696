"""A websocket policy server that speaks openpi's and StarVLA's protocols, with micro-batching.

    python -m hf_vla.serving.server --model PATH --port 8000 [--api-key KEY] [--unnorm-key bridge]

Transport: websockets, binary frames of msgpack with numpy arrays (see `msgpack_numpy`), no compression.

Handshake. On connect the server sends one metadata map first: `model_type`, `action_chunk_size` (the steps a reply
holds: the server's `execute_steps`, else `action_horizon`; openpi's chunk broker indexes up to it), `action_horizon`,
`action_dim`, `state_dim`, `cameras`, `available_unnorm_keys`, `default_unnorm_key`, `training_obs_image_size`
([H, W] the views are resized to), `eval_image_contract`, `ckpt_path`, and the server's batching, post-processing and
size limits.

Requests. Each binary frame is one map, answered by one frame, in order.

1. openpi form (any map without `type`, `payload` or `examples`): an observation, reply
   `{"actions": float32 [T, D] (or [B, T, D] for a batched observation), "server_timing": {...}}`.
   * images: `{"images": {camera: uint8 [H, W, 3] or [B, H, W, 3]}}` with exactly the model's cameras, or flat
     top-level keys `<camera>`, `observation/<camera>`, `observation/images/<camera>` or `observation.images.<camera>`
     (other keys are ignored); a one-camera model also takes `image` / `observation/image`. Any image size is
     accepted (bicubic resize to `training_obs_image_size`).
   * instruction: `prompt` or `instruction`, a string or one string per sample (a single string is broadcast).
   * state (optional): `state`, `observation/state` or `observation.state`, float [S] or [B, S].
   * `unnorm_key` (optional): which embodiment's statistics decode the actions.
2. StarVLA form: `{"type": "infer" | "predict_action" | "ping", "request_id": ..., "payload": {"examples": [{"image":
   [uint8 HWC per camera], "lang": str, "state"?: [S]}], "unnorm_key": ...}}`, or the payload's keys at top level;
   the 2025 form `{"batch_images": [[uint8 HWC per camera]] * B, "instructions": [str] * B, "state"?: [B, S]}` too.
   Reply `{"status": "ok", "ok": True, "type": "inference_result", "request_id": ..., "data": {"actions": [B, T, D],
   "normalized_actions": [B, T, D]}, "server_timing": {...}}`: `actions` in robot units (current StarVLA servers),
   `normalized_actions` the model's output before un-normalisation (what StarVLA's servers sent before they
   un-normalised, and its clients of that time un-normalise themselves; cut to `execute_steps`, no other
   post-processing); ping → `{"status": "ok", "ok": True, "type": "ping"}`. Other framework keys (`do_sample`,
   `use_ddim`, ...) are ignored.
3. `{"type": "configure", <post-processing options>}` (or the options under `payload`) sets this connection's
   action post-processing; omitted options keep their value, `None` clears one. Reply `{"status": "ok", "ok": True,
   "type": "configure", "post_processing": {...}, "action_chunk_size": n}` (the steps a reply now holds). Options,
   applied per sample in this order:
   * `delta_dims` [i, ...] and `delta_state_dims` (default: the same indices): delta → absolute,
     `action[t, i] = state[j] + sum(action[:t+1, i])`; the observation must then carry its state.
   * `gripper_dims`, `gripper_threshold` (0.5), `gripper_low` (0.0), `gripper_high` (1.0): binarise to high / low.
   * `execute_steps` N: keep only the first N steps of each chunk.
   Server-wide defaults come from `--execute-steps`, `--delta-dims`, ... flags.

Errors never close the connection: openpi-form requests (and frames that cannot be read) get
`{"error": "<field>: <what is wrong>"}`, StarVLA-form ones `{"status": "error", "ok": False, "request_id": ...,
"error": {"message": ...}}`. Frames over `max_frame_bytes` are refused by websockets itself (close code 1009, the
frame is never read); arrays over `max_array_bytes` and requests over `max_request_rows` samples get error replies.

HTTP: `GET /healthz` → 200 "OK" (no key needed). With an API key set, the upgrade needs `Authorization: Bearer KEY`,
`Authorization: Api-Key KEY` (openpi-client's form) or `x-api-key: KEY`, else HTTP 401.

Micro-batching: requests from concurrent clients are queued; the batcher takes the first and keeps collecting for up
to `batch_window_ms` or `max_batch` samples, but only while another connection is expected to send within the window
(judged from each connection's usual gap between a reply and its next request), so a lone client or one beside idle
connections never waits. It groups samples that can share a call (same unnorm key, camera image sizes and state
presence), runs one `policy.predict` per group on a worker thread and hands every client its own rows. Models that
sample noise (flow-matching heads) draw it per call, so their batched results differ from single calls by that noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import reprlib
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as websocket_serve

from .msgpack_numpy import packb, unpackb

logger = logging.getLogger("hf_vla.serving")

FLAT_IMAGE_PREFIXES = ("", "observation/", "observation/images/", "observation.images.")
SINGLE_CAMERA_ALIASES = ("image", "observation/image")
STATE_KEYS = ("state", "observation/state", "observation.state")
STARVLA_MARKERS = ("type", "payload", "examples", "batch_images")
INFER_TYPES = ("infer", "predict_action")


# ---------------------------------------------------------------- post-processing


@dataclass(frozen=True)
class PostProcess:
    """Per-sample action post-processing (delta → absolute, gripper binarisation, first N steps)."""

    execute_steps: int | None = None
    delta_dims: tuple[int, ...] = ()
    delta_state_dims: tuple[int, ...] | None = None
    gripper_dims: tuple[int, ...] = ()
    gripper_threshold: float = 0.5
    gripper_low: float = 0.0
    gripper_high: float = 1.0

    def updated(self, options: Mapping) -> PostProcess:
        """A copy with `options` applied (None resets an option to its default); raises ValueError on bad input."""
        names = set(self.__dataclass_fields__)
        unknown = sorted(str(k) for k in options if k not in names)
        if unknown:
            raise ValueError(f"configure: unknown option(s) {unknown}; known: {sorted(names)}")
        defaults, values = PostProcess(), {}
        for name, value in options.items():
            if value is None:
                values[name] = getattr(defaults, name)
            elif name == "execute_steps":
                values[name] = _as_int(value, name)
            elif name.endswith("_dims"):
                if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) != 1:
                    raise ValueError(f"{name}: expected a list of dimension indices, got {reprlib.repr(value)}")
                values[name] = tuple(_as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                    raise ValueError(f"{name}: expected a finite number, got {reprlib.repr(value)}")
                values[name] = float(value)
        return replace(self, **values)

    def check(self, action_horizon: int, action_dim: int, state_dim: int) -> None:
        for name in ("gripper_threshold", "gripper_low", "gripper_high"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)}")
        if self.execute_steps is not None and not 1 <= self.execute_steps <= action_horizon:
            raise ValueError(f"execute_steps: expected 1..{action_horizon}, got {self.execute_steps}")
        for name in ("delta_dims", "gripper_dims"):
            bad = [d for d in getattr(self, name) if not 0 <= d < action_dim]
            if bad:
                raise ValueError(f"{name}: indices {bad} out of range for action_dim {action_dim}")
        if self.delta_state_dims is not None and len(self.delta_state_dims) != len(self.delta_dims):
            raise ValueError(f"delta_state_dims: expected {len(self.delta_dims)} indices (one per delta_dims), "
                             f"got {len(self.delta_state_dims)}")
        # the state indices the delta integration reads: delta_state_dims, or else delta_dims themselves
        name = "delta_state_dims" if self.delta_state_dims is not None else "delta_dims"
        bad = [d for d in getattr(self, name) if d < 0 or (state_dim and d >= state_dim)]
        if self.delta_dims and bad:
            raise ValueError(f"{name}: state indices {bad} out of range for state_dim {state_dim}")

    @property
    def needs_state(self) -> bool:
        return bool(self.delta_dims)

    def apply(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """`actions` float32 [T, D] of one sample, `state` its raw state [S] → post-processed [T', D]."""
        out = np.array(actions, dtype=np.float32)
        if self.delta_dims:
            dims = list(self.delta_dims)
            state_dims = list(self.delta_state_dims if self.delta_state_dims is not None else self.delta_dims)
            if state is None or max(state_dims) >= state.shape[-1]:
                raise ValueError(f"state: delta_dims post-processing needs a state with indices {state_dims}")
            out[:, dims] = state[state_dims].astype(np.float32) + np.cumsum(out[:, dims], axis=0)
        if self.gripper_dims:
            dims = list(self.gripper_dims)
            out[:, dims] = np.where(out[:, dims] > self.gripper_threshold, self.gripper_high, self.gripper_low)
        if self.execute_steps is not None:
            out = out[: self.execute_steps]
        return out

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {reprlib.repr(value)}")
    return int(value)


# ---------------------------------------------------------------- requests


@dataclass
class Row:
    """One sample: a view per camera (uint8 [H, W, 3]), its instruction, raw state and unnorm key."""

    views: tuple[np.ndarray, ...]
    instruction: str
    state: np.ndarray | None
    unnorm_key: str | None

    def group_key(self) -> tuple:
        return self.unnorm_key, tuple(v.shape for v in self.views), self.state is not None


@dataclass
class Request:
    rows: list[Row]
    unbatched: bool = False


@dataclass
class Limits:
    max_frame_bytes: int = 64 << 20
    max_array_bytes: int = 32 << 20
    max_request_rows: int = 64
    max_instruction_chars: int = 4096


class RequestParser:
    """Validates decoded messages against the model (cameras, dtypes, shapes, keys) and turns them into rows."""

    def __init__(self, processor, default_unnorm_key: str | None, limits: Limits):
        self.cameras = list(processor.camera_names)
        self.state_dim = int(processor.state_dim)
        self.unnorm_keys = sorted(processor.norm_stats or {})
        if default_unnorm_key is None and len(self.unnorm_keys) == 1:
            default_unnorm_key = self.unnorm_keys[0]
        if default_unnorm_key is not None and default_unnorm_key not in self.unnorm_keys:
            raise ValueError(f"unnorm_key: unknown default key {default_unnorm_key!r}; available: {self.unnorm_keys}")
        self.default_unnorm_key = default_unnorm_key
        self.limits = limits

    def openpi(self, obs: Mapping) -> Request:
        images = obs.get("images")
        if images is None:
            images, prefix = self._flat_images(obs), ""
        elif not isinstance(images, Mapping):
            raise ValueError(f"images: expected a map camera -> uint8 array, got {type(images).__name__}")
        else:
            unknown = [str(c) for c in images if c not in self.cameras]
            if unknown:
                raise ValueError(f"images: unknown camera(s) {unknown}; this model takes {self.cameras}")
            prefix = "images."
        arrays = {}
        for camera in self.cameras:
            if camera not in images:
                raise ValueError(f"images.{camera}: missing; this model takes cameras {self.cameras}")
            arrays[camera] = self._image(images[camera], f"{prefix}{camera}", ranks=(3, 4))
        ranks = {a.ndim for a in arrays.values()}
        if len(ranks) > 1:
            raise ValueError("images: mix of batched [B, H, W, 3] and unbatched [H, W, 3] views")
        unbatched = ranks == {3}
        if unbatched:
            arrays = {c: a[None] for c, a in arrays.items()}
        sizes = {c: a.shape[0] for c, a in arrays.items()}
        batch = next(iter(sizes.values()))
        if len(set(sizes.values())) > 1:
            raise ValueError(f"images: cameras have different batch sizes {sizes}")
        self._check_rows(batch, "images")

        text_key = "instruction" if "instruction" in obs else "prompt"
        instructions = self._instructions(obs.get(text_key), batch, text_key)
        state_key = next((k for k in STATE_KEYS if obs.get(k) is not None), None)
        states = [None] * batch
        if state_key is not None:
            state = self._numeric(obs[state_key], state_key)
            if state.ndim == 1 and batch == 1:
                state = state[None]
            if state.ndim != 2 or state.shape[0] != batch:
                raise ValueError(f"{state_key}: expected [S] or [{batch}, S], got {list(state.shape)}")
            self._check_state_width(state.shape[1], state_key)
            states = list(state)
        key = self._unnorm_key(obs.get("unnorm_key"), "unnorm_key")
        rows = [
            Row(tuple(arrays[c][b] for c in self.cameras), instructions[b], states[b], key) for b in range(batch)
        ]
        return Request(rows, unbatched=unbatched)

    def starvla(self, message: Mapping) -> Request:
        payload, where = message, ""
        if "payload" in message:
            payload, where = message["payload"], "payload."
            if not isinstance(payload, Mapping):
                raise ValueError(f"payload: expected a map, got {type(payload).__name__}")
        if "examples" not in payload and "batch_images" in payload:
            return self._starvla_batch_images(payload, where)
        examples = payload.get("examples")
        if not isinstance(examples, list) or not examples:
            raise ValueError(f"{where}examples: expected a non-empty list of examples, got {reprlib.repr(examples)}")
        self._check_rows(len(examples), f"{where}examples")
        key = self._unnorm_key(payload.get("unnorm_key"), f"{where}unnorm_key")
        rows = []
        for i, example in enumerate(examples):
            field_name = f"{where}examples[{i}]"
            if not isinstance(example, Mapping):
                raise ValueError(f"{field_name}: expected a map, got {type(example).__name__}")
            text_key = next((k for k in ("lang", "instruction", "prompt") if k in example), "lang")
            (instruction,) = self._instructions(example.get(text_key), 1, f"{field_name}.{text_key}")
            state = None
            if example.get("state") is not None:
                state = self._example_state(example["state"], f"{field_name}.state")
            rows.append(Row(self._views(example.get("image"), f"{field_name}.image"), instruction, state, key))
        return Request(rows)

    def _starvla_batch_images(self, payload: Mapping, where: str) -> Request:
        """StarVLA's request before `examples` (2025 clients, e.g. LIBERO's `M1Inference`): `batch_images` (per
        sample, a list of views), `instructions` (one per sample) and an optional `state` ([B, S] or [B, 1, S])."""
        images = payload["batch_images"]
        if not isinstance(images, list) or not images:
            raise ValueError(f"{where}batch_images: expected a non-empty list (per sample, a list of camera views), "
                             f"got {reprlib.repr(images)}")
        self._check_rows(len(images), f"{where}batch_images")
        instructions = self._instructions(payload.get("instructions"), len(images), f"{where}instructions")
        states = [None] * len(images)
        if payload.get("state") is not None:
            state = payload["state"]
            if isinstance(state, np.ndarray) and state.ndim == 3 and state.shape[1] == 1:
                state = state[:, 0]  # [B, 1, S], as StarVLA's frameworks took it
            state = self._numeric(state, f"{where}state")
            if state.ndim != 2 or state.shape[0] != len(images):
                raise ValueError(f"{where}state: expected [{len(images)}, S] or [{len(images)}, 1, S] (one row per "
                                 f"sample of batch_images), got {list(state.shape)}")
            states = [self._example_state(row, f"{where}state[{b}]") for b, row in enumerate(state)]
        key = self._unnorm_key(payload.get("unnorm_key"), f"{where}unnorm_key")
        rows = [Row(self._views(views, f"{where}batch_images[{b}]"), instructions[b], states[b], key)
                for b, views in enumerate(images)]  # fmt: skip
        return Request(rows)

    def _views(self, views: Any, name: str) -> tuple[np.ndarray, ...]:
        views = [views] if isinstance(views, np.ndarray) else views
        if not isinstance(views, list) or len(views) != len(self.cameras):
            got = len(views) if isinstance(views, list) else type(views).__name__
            raise ValueError(f"{name}: expected a list of {len(self.cameras)} uint8 [H, W, 3] arrays "
                             f"(cameras {self.cameras}), got {got}")
        return tuple(self._image(v, f"{name}[{j}]", ranks=(3,)) for j, v in enumerate(views))

    def _example_state(self, value: Any, name: str) -> np.ndarray:
        state = self._numeric(value, name)
        if state.ndim == 2 and state.shape[0] != 1:
            raise ValueError(f"{name}: expected [S] or [1, S] for one example, got {list(state.shape)}")
        state = state.reshape(-1)
        self._check_state_width(state.shape[0], name)
        return state

    # -- field checks

    def _flat_images(self, obs: Mapping) -> dict:
        found = {}
        for camera in self.cameras:
            names = [p + camera for p in FLAT_IMAGE_PREFIXES]
            if len(self.cameras) == 1:
                names += list(SINGLE_CAMERA_ALIASES)
            name = next((n for n in names if n in obs), None)
            if name is None:
                keys = sorted(str(k) for k in obs)[:12]
                raise ValueError(f"images.{camera}: missing; send an `images` map or a key among {names} "
                                 f"(got keys {keys})")
            found[camera] = obs[name]
        return found

    def _image(self, array: Any, name: str, ranks: tuple[int, ...]) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{name}: expected a uint8 numpy array, got {type(array).__name__}")
        if array.dtype != np.uint8:
            raise ValueError(f"{name}: expected dtype uint8, got {array.dtype}")
        shapes = " or ".join({3: "[H, W, 3]", 4: "[B, H, W, 3]"}[r] for r in ranks)
        if array.ndim not in ranks or array.shape[-1] != 3 or min(array.shape[-3:-1]) < 1:
            raise ValueError(f"{name}: expected shape {shapes}, got {list(array.shape)}")
        return array

    def _instructions(self, value: Any, batch: int, name: str) -> list[str]:
        if value is None:
            raise ValueError(f"{name}: missing; send the instruction as `prompt` or `instruction`"
                             if name in ("prompt", "instruction") else f"{name}: missing instruction")
        if isinstance(value, str):
            value = [value] * batch
        if not isinstance(value, (list, tuple)) or len(value) != batch or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: expected a string or {batch} string(s), got {reprlib.repr(value)}")
        too_long = [i for i, v in enumerate(value) if len(v) > self.limits.max_instruction_chars]
        if too_long:
            raise ValueError(f"{name}: longer than {self.limits.max_instruction_chars} characters")
        return list(value)

    def _numeric(self, value: Any, name: str) -> np.ndarray:
        if isinstance(value, (list, tuple)):
            try:
                value = np.asarray(value)  # no dtype: strings and booleans must not pass as numbers
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected a list of numbers") from None
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
            got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"{name}: expected a float array, got {got}")
        if value.ndim not in (1, 2):
            raise ValueError(f"{name}: expected [S] or [B, S], got {list(value.shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"{name}: contains NaN or inf")
        return value.astype(np.float32)

    def _check_state_width(self, width: int, name: str) -> None:
        # A model without state still accepts one (clients often send it anyway; post-processing may use it).
        if self.state_dim and width != self.state_dim:
            raise ValueError(f"{name}: expected {self.state_dim} values per sample, got {width}")

    def _check_rows(self, rows: int, name: str) -> None:
        if rows < 1:
            raise ValueError(f"{name}: expected at least one sample, got 0")
        if rows > self.limits.max_request_rows:
            limit = self.limits.max_request_rows
            raise ValueError(f"{name}: {rows} samples exceed the server's max_request_rows={limit}")

    def _unnorm_key(self, key: Any, name: str) -> str | None:
        key = self.default_unnorm_key if key is None else key
        if key is None:
            if len(self.unnorm_keys) > 1:
                raise ValueError(f"{name}: several embodiments are known, name one of {self.unnorm_keys}")
            return None  # no statistics at all: predict reports it
        if not isinstance(key, str) or key not in self.unnorm_keys:
            raise ValueError(f"{name}: unknown key {reprlib.repr(key)}; available: {self.unnorm_keys}")
        return key


# ---------------------------------------------------------------- micro-batching


@dataclass
class BatchResult:
    actions: list[np.ndarray]  # per row, float32 [T, D] in robot units
    normalized: list[np.ndarray] = field(default_factory=list)  # per row, the model's own output [T, D]
    infer_ms: float = 0.0
    batch_rows: int = 0


@dataclass
class BatchStats:
    requests: int = 0
    rows: int = 0
    predict_calls: int = 0
    batched_calls: int = 0  # predict calls that served more than one request
    largest_batch: int = 0
    fallbacks: int = 0  # batched calls that failed and were retried one sample at a time


@dataclass(eq=False)
class ClientActivity:
    """A connection's request rhythm, so the batcher waits only for requests that are likely to come."""

    last_reply: float  # loop time of the last reply (or of the metadata frame)
    think_s: float | None = None  # running mean of the gap between a reply and the next request
    pending: bool = False

    def request_arrived(self, now: float) -> None:
        gap = now - self.last_reply
        self.think_s = gap if self.think_s is None else 0.7 * self.think_s + 0.3 * gap
        self.pending = True

    def replied(self, now: float) -> None:
        self.last_reply, self.pending = now, False

    def expected_by(self, deadline: float, now: float, window_s: float) -> bool:
        if self.pending:
            return False
        if self.think_s is None:  # no rhythm yet: expect it only right after its metadata frame
            return now - self.last_reply <= window_s
        due = self.last_reply + self.think_s
        return due <= deadline and now <= due + self.think_s + window_s  # long overdue: the client is idle


class MicroBatcher:
    """Queues requests, merges compatible rows across them and runs `policy.predict` on one worker thread."""

    def __init__(self, policy, enabled: bool, window_ms: float, max_batch: int):
        self.policy = policy
        self.enabled = enabled
        self.window_s = window_ms / 1e3
        self.max_batch = max_batch
        self.clients: set[ClientActivity] = set()
        self.stats = BatchStats()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf-vla-predict")

    async def predict(self, rows: list[Row]) -> BatchResult:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((rows, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            jobs = [job for job in jobs if not job[1].done()]  # clients that left while queued
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._predict_jobs, [rows for rows, _ in jobs])
            except Exception as error:  # _predict_jobs catches model errors; this is a last resort
                results = [error] * len(jobs)
            for (_, future), result in zip(jobs, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _collect(self) -> list:
        jobs = [await self._queue.get()]
        if not self.enabled:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        rows = len(jobs[0][0])
        while rows < self.max_batch:
            if self._queue.empty():
                now = loop.time()
                if now >= deadline or not any(c.expected_by(deadline, now, self.window_s) for c in self.clients):
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), deadline - now)
                except asyncio.TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            jobs.append(job)
            rows += len(job[0])
        return jobs

    # -- worker thread

    def _predict_jobs(self, jobs: list[list[Row]]) -> list[BatchResult | Exception]:
        groups = defaultdict(list)
        for j, rows in enumerate(jobs):
            for r, row in enumerate(rows):
                groups[row.group_key()].append((j, r, row))
        outputs: list[list[Any]] = [[None] * len(rows) for rows in jobs]
        results = [BatchResult([]) for _ in jobs]
        size = self.max_batch if self.enabled else max(len(m) for m in groups.values())
        for members in groups.values():
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                begin = time.perf_counter()
                for (j, r, _), value in zip(chunk, self._predict_rows([row for _, _, row in chunk])):
                    outputs[j][r] = value
                elapsed = (time.perf_counter() - begin) * 1e3
                self._count(chunk)
                for j in {j for j, _, _ in chunk}:
                    results[j].infer_ms += elapsed
                    results[j].batch_rows = max(results[j].batch_rows, len(chunk))
        self.stats.requests += len(jobs)
        final: list[BatchResult | Exception] = []
        for result, values in zip(results, outputs):
            error = next((v for v in values if isinstance(v, Exception)), None)
            if error is None:
                result.actions, result.normalized = [v[0] for v in values], [v[1] for v in values]
            final.append(error if error is not None else result)
        return final

    def _predict_rows(self, rows: list[Row]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        try:
            return list(self._call(rows))
        except Exception as error:
            if len(rows) == 1:
                return [_as_request_error(error)]
        # One bad sample must not fail its batch-mates: retry each alone.
        self.stats.fallbacks += 1
        values = []
        for row in rows:
            try:
                values.append(self._call([row])[0])
            except Exception as error:
                values.append(_as_request_error(error))
        return values

    def _call(self, rows: list[Row]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(robot-unit actions, normalised model output) per row."""
        cameras = self.policy.processor.camera_names
        obs = {
            "images": {c: np.stack([row.views[i] for row in rows]) for i, c in enumerate(cameras)},
            "instruction": [row.instruction for row in rows],
        }
        if rows[0].state is not None and self.policy.processor.state_dim:
            obs["state"] = np.stack([row.state for row in rows])
        actions, normalized = self.policy.predict(obs, unnorm_key=rows[0].unnorm_key, return_normalized=True)
        return list(zip(actions, normalized))

    def _count(self, chunk: list) -> None:
        self.stats.predict_calls += 1
        self.stats.rows += len(chunk)
        self.stats.largest_batch = max(self.stats.largest_batch, len(chunk))
        if len({j for j, _, _ in chunk}) > 1:
            self.stats.batched_calls += 1


def _as_request_error(error: Exception) -> Exception:
    if isinstance(error, ValueError):
        return error
    logger.error("inference failed", exc_info=error)
    return RuntimeError(f"inference failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------- server


@dataclass
class _Connection:
    postprocess: PostProcess
    prev_total_ms: float | None = None


@dataclass
class ServerOptions:
    api_key: str | None = None
    unnorm_key: str | None = None
    batching: bool = True
    batch_window_ms: float = 5.0
    max_batch: int = 16
    postprocess: PostProcess = field(default_factory=PostProcess)
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """Raises, naming the option, instead of clamping a value that would misbehave."""
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {self.max_batch!r}")
        if not self.batch_window_ms >= 0 or not np.isfinite(self.batch_window_ms):
            raise ValueError(f"batch_window_ms: expected a finite number ≥ 0, got {self.batch_window_ms!r}")
        for name, value in asdict(self.limits).items():
            if value < 1:
                raise ValueError(f"{name}: expected a positive limit, got {value}")


class PolicyServer:
    """Serves a `VLAPolicy` over websockets. `serve_forever()` blocks; `start()` / `stop()` run it on a thread."""

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, *, ckpt_path: str | None = None, **options):
        self.policy = policy
        self.host, self.port = host, port
        self.options = ServerOptions(**options)
        self.options.check()
        processor = policy.processor
        default_key = self.options.unnorm_key or getattr(policy, "unnorm_key", None)
        self.parser = RequestParser(processor, default_key, self.options.limits)
        self.options.postprocess.check(processor.action_horizon, processor.action_dim, processor.state_dim)
        self.metadata = self._metadata(ckpt_path)
        self.batcher: MicroBatcher | None = None
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future | None = None
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> dict:
        stats = asdict(self.batcher.stats) if self.batcher else asdict(BatchStats())
        return {**stats, "open_connections": self._connections}

    # -- lifecycle

    def serve_forever(self) -> None:
        """Serves until Ctrl-C or SIGTERM."""
        try:
            asyncio.run(self._serve(handle_signals=True))
        except KeyboardInterrupt:
            pass
        logger.info("stopped")

    def start(self, timeout: float = 30.0) -> PolicyServer:
        started, failure = threading.Event(), []

        def target():
            try:
                asyncio.run(self._serve(started))
            except BaseException as error:  # surfaced to start()'s caller
                failure.append(error)
                started.set()

        self._thread = threading.Thread(target=target, name="hf-vla-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("the policy server did not start in time")
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(lambda: self._stopped.done() or self._stopped.set_result(None))
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, started: threading.Event | None = None, handle_signals: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        if handle_signals and hasattr(signal, "SIGTERM"):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows, or not the main thread
                self._loop.add_signal_handler(signal.SIGTERM, lambda: self._stopped.done() or
                                              self._stopped.set_result(None))
        opts = self.options
        self.batcher = MicroBatcher(self.policy, opts.batching, opts.batch_window_ms, opts.max_batch)
        batch_task = asyncio.create_task(self.batcher.run())
        try:
            async with websocket_serve(
                self._handle,
                self.host,
                self.port,
                process_request=self._process_request,
                compression=None,
                max_size=opts.limits.max_frame_bytes,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                logger.info("serving %s on ws://%s:%d", self.metadata["model_type"], self.host, self.port)
                if started is not None:
                    started.set()
                await self._stopped
        finally:
            batch_task.cancel()
            await asyncio.gather(batch_task, return_exceptions=True)
            self.batcher.close()

    # -- HTTP

    def _process_request(self, connection: ServerConnection, request):
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.options.api_key and not self._authorized(request.headers):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid API key\n")
        return None

    def _authorized(self, headers) -> bool:
        candidates = [headers.get("x-api-key", "")]
        scheme, _, credential = headers.get("Authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "api-key"):
            candidates.append(credential.strip())
        expected = self.options.api_key.encode()
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates if c)

    # -- websocket

    async def _handle(self, websocket: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        self._connections += 1
        connection = _Connection(self.options.postprocess)
        activity = ClientActivity(loop.time())
        self.batcher.clients.add(activity)
        try:
            await websocket.send(packb(self.metadata))
            activity.replied(loop.time())
            async for frame in websocket:
                activity.request_arrived(loop.time())
                reply = self._pack(await self._reply(frame, connection))
                await websocket.send(reply)
                activity.replied(loop.time())
        except websockets.ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection handler failed")
        finally:
            self._connections -= 1
            self.batcher.clients.discard(activity)

    @staticmethod
    def _pack(reply: dict) -> bytes:
        try:
            return packb(reply)
        except Exception as error:  # e.g. an echoed request_id that cannot be packed again
            return packb({"error": f"reply: cannot be packed ({error})"})

    async def _reply(self, frame: bytes | str, connection: _Connection) -> dict:
        start = time.perf_counter()
        starvla, request_id = False, None
        try:
            if isinstance(frame, str):
                raise ValueError("frame: text frames are not accepted; send a binary msgpack map")
            message = unpackb(frame, self.options.limits.max_array_bytes)
            if not isinstance(message, dict):
                raise ValueError(f"message: expected a map, got {type(message).__name__}")
            starvla = any(key in message for key in STARVLA_MARKERS)
            request_id = message.get("request_id")
            kind = message.get("type", "infer")
            if kind == "configure":
                return self._configure(message, connection, request_id)
            if kind == "ping":
                return _ok("ping", request_id)
            if kind not in INFER_TYPES:
                raise ValueError(f"type: unknown request type {reprlib.repr(kind)}; "
                                 "expected infer, predict_action, ping or configure")
            request = self.parser.starvla(message) if starvla else self.parser.openpi(message)
            actions, normalized, result = await self._infer(request, connection.postprocess)
            total_ms = (time.perf_counter() - start) * 1e3
            timing = {"infer_ms": result.infer_ms, "batch_size": result.batch_rows, "total_ms": total_ms}
            if connection.prev_total_ms is not None:
                timing["prev_total_ms"] = connection.prev_total_ms
            connection.prev_total_ms = total_ms
            if starvla:
                data = {"actions": actions, "normalized_actions": normalized}
                return {**_ok("inference_result", request_id), "data": data, "server_timing": timing}
            return {"actions": actions, "server_timing": timing}
        except (ValueError, RuntimeError) as error:
            return _error(str(error), starvla, request_id)
        except Exception as error:
            logger.exception("request failed")
            return _error(f"internal error: {type(error).__name__}: {error}", starvla, request_id)

    async def _infer(self, request: Request, postprocess: PostProcess) -> tuple[np.ndarray, np.ndarray, BatchResult]:
        """Post-processed actions and the normalised model output (cut to the same `execute_steps`, otherwise
        untouched), each `[B, T, D]` (`[T, D]` for an unbatched request), and the batch's timing."""
        if postprocess.needs_state and any(row.state is None for row in request.rows):
            raise ValueError("state: missing; this connection's delta_dims post-processing needs the state")
        result = await self.batcher.predict(request.rows)
        chunks = [postprocess.apply(actions, row.state) for actions, row in zip(result.actions, request.rows)]
        actions = np.stack(chunks).astype(np.float32, copy=False)
        normalized = np.stack(result.normalized)[:, : actions.shape[1]].astype(np.float32, copy=False)
        if request.unbatched:
            return actions[0], normalized[0], result
        return actions, normalized, result

    def _configure(self, message: Mapping, connection: _Connection, request_id: Any) -> dict:
        top_level = {k: v for k, v in message.items() if k not in ("type", "request_id", "payload")}
        if "payload" in message and top_level:
            raise ValueError(f"configure: options both in payload and at the top level {sorted(map(str, top_level))}")
        options = message.get("payload", top_level)
        if not isinstance(options, Mapping):
            raise ValueError(f"payload: expected a map of post-processing options, got {type(options).__name__}")
        updated = connection.postprocess.updated(options)
        processor = self.policy.processor
        updated.check(processor.action_horizon, processor.action_dim, processor.state_dim)
        connection.postprocess = updated
        return {**_ok("configure", request_id), "post_processing": updated.as_dict(),
                "action_chunk_size": updated.execute_steps or processor.action_horizon}  # fmt: skip

    def _metadata(self, ckpt_path: str | None) -> dict:
        processor, opts = self.policy.processor, self.options
        height, width = processor.image_size
        return {
            "server": "hf_vla",
            "model_type": getattr(self.policy.model.config, "model_type", None),
            "ckpt_path": ckpt_path,
            "action_chunk_size": opts.postprocess.execute_steps or processor.action_horizon,  # the steps a reply holds
            "action_horizon": processor.action_horizon,
            "action_dim": processor.action_dim,
            "state_dim": processor.state_dim,
            "cameras": list(processor.camera_names),
            "available_unnorm_keys": sorted(processor.norm_stats or {}),
            "default_unnorm_key": self.parser.default_unnorm_key,
            "training_obs_image_size": [height, width],
            "eval_image_contract": f"uint8 RGB [H, W, 3] per camera, any size; resized (bicubic) to {height}x{width}",
            "batching": {"enabled": opts.batching, "batch_window_ms": opts.batch_window_ms,
                         "max_batch": opts.max_batch},
            "post_processing": opts.postprocess.as_dict(),
            "limits": asdict(opts.limits),
        }


def _ok(kind: str, request_id: Any) -> dict:
    reply = {"status": "ok", "ok": True, "type": kind}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


def _error(message: str, starvla: bool, request_id: Any) -> dict:
    if not starvla:
        return {"error": message}
    reply = {"status": "error", "ok": False, "type": "error", "error": {"message": message}}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


# ---------------------------------------------------------------- entry points


def serve(model_or_policy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
          dtype=None, device=None, pack_linear_weights: bool = False, **options) -> None:
    """Serves a `VLAPolicy` (or a model directory / hub id, loaded with `VLAPolicy.from_pretrained` with `dtype`,
    `device` and `pack_linear_weights`) until interrupted.

    `options`: unnorm_key, batching, batch_window_ms, max_batch, postprocess (a `PostProcess`), limits (a `Limits`).
    """
    ckpt_path = None
    if isinstance(model_or_policy, (str, os.PathLike)):
        from ..policy import VLAPolicy

        ckpt_path = str(model_or_policy)
        model_or_policy = VLAPolicy.from_pretrained(
            ckpt_path, dtype=dtype, device=device, pack_linear_weights=pack_linear_weights
        )
    PolicyServer(model_or_policy, host, port, api_key=api_key, ckpt_path=ckpt_path, **options).serve_forever()


def _dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` options, for `main` and for an `hf-vla serve` sub-command."""
    parser.add_argument("model_path", nargs="?", metavar="MODEL", help="model directory or hub id")
    parser.add_argument("--model", help="the same, as an option (default: the embedded default model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("HF_VLA_API_KEY"),
                        help="require this key (default: $HF_VLA_API_KEY; none = open)")
    parser.add_argument("--unnorm-key", help="default embodiment statistics for decoding actions")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", help="torch device, e.g. cuda")
    parser.add_argument("--pack-linear-weights", action="store_true",
                        help="CPU float32: run large linear layers through oneDNN on weights packed once (faster, "
                             "a second copy of those weights in memory)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to gather concurrent requests")
    parser.add_argument("--max-batch", type=int, default=16, help="most samples per batched predict call")
    parser.add_argument("--no-batching", action="store_true", help="one predict call per request")
    parser.add_argument("--max-frame-mb", type=float, default=64, help="larger frames close the connection (1009)")
    parser.add_argument("--max-array-mb", type=float, default=32, help="larger arrays get an error reply")
    group = parser.add_argument_group("default action post-processing (clients may change it with `configure`)")
    group.add_argument("--execute-steps", type=int, help="reply with only the first N steps of each chunk")
    group.add_argument("--delta-dims", type=_dims, default=(), help="e.g. 0,1,2: add cumulative deltas to the state")
    group.add_argument("--delta-state-dims", type=_dims, help="state indices for --delta-dims (default: the same)")
    group.add_argument("--gripper-dims", type=_dims, default=(), help="e.g. 6: binarise these dimensions")
    group.add_argument("--gripper-threshold", type=float, default=0.5)
    group.add_argument("--gripper-low", type=float, default=0.0)
    group.add_argument("--gripper-high", type=float, default=1.0)
    return parser


def options_from_args(args: argparse.Namespace) -> dict:
    """`serve` keyword arguments from parsed `add_arguments` options."""
    postprocess = PostProcess(
        execute_steps=args.execute_steps,
        delta_dims=tuple(args.delta_dims),
        delta_state_dims=None if args.delta_state_dims is None else tuple(args.delta_state_dims),
        gripper_dims=tuple(args.gripper_dims),
        gripper_threshold=args.gripper_threshold,
        gripper_low=args.gripper_low,
        gripper_high=args.gripper_high,
    )
    limits = Limits(max_frame_bytes=int(args.max_frame_mb * 2**20), max_array_bytes=int(args.max_array_mb * 2**20))
    return dict(
        host=args.host, port=args.port, api_key=args.api_key or None, unnorm_key=args.unnorm_key,
        batching=not args.no_batching, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
        postprocess=postprocess, limits=limits,
        dtype=_torch_dtype(args.dtype), device=args.device, pack_linear_weights=args.pack_linear_weights,
    )


def _torch_dtype(name: str | None):
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def run_from_args(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # the address line (with --port 0 the only place the port shows)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one INFO line per connection is noise
    if args.model and args.model_path and args.model != args.model_path:
        raise SystemExit(f"hf-vla serve: two models given ({args.model_path!r} and --model {args.model!r})")
    args.model = args.model or args.model_path
    if args.model is None:
        from ..defaults import default_model_dir

        args.model = default_model_dir()
        print("note: serving the embedded default model (a tiny policy trained on Meta-World)", file=sys.stderr)
    serve(args.model, **options_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="hf-vla serve", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
