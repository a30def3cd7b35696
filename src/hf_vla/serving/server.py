"""A websocket policy server that speaks openpi's and StarVLA's protocols, with micro-batching.

    python -m hf_vla.serving.server --model PATH --port 8000 [--api-key KEY] [--unnorm-key bridge]

Transport: websockets, binary frames of msgpack with numpy arrays (see `msgpack_numpy`), no compression.

Handshake. On connect the server sends one metadata map first: `model_type`, `action_chunk_size` (the steps a reply
holds: the server's `execute_steps`, else `action_horizon`; openpi's chunk broker indexes up to it), `action_horizon`,
`action_dim`, `state_dim`, `cameras`, `available_unnorm_keys`, `embodiment_dims` (per key, the widths of that
embodiment's actions and state: smaller than the model's for one a cross-embodiment mixture padded; replies and
states use them), `default_unnorm_key`, `training_obs_image_size`
([H, W] the views are resized to), `eval_image_contract`, `ckpt_path`, and the server's batching, post-processing and
size limits.

Requests. Each binary frame is one map, answered by one frame, in order.

1. openpi form (any map without `type`, `payload`, `examples` or `batch_images`): an observation, reply
   `{"actions": float32 [T, D] (or [B, T, D] for a batched observation), "server_timing": {...}}`.
   * images: `{"images": {camera: uint8 [H, W, 3] or [B, H, W, 3]}}` (or channels first, `[3, H, W]` as openpi's
     ALOHA clients send, where the last axis is not 3) with exactly the model's cameras, or flat
     top-level keys `<camera>`, `observation/<camera>`, `observation/images/<camera>` or `observation.images.<camera>`;
     also openpi's LIBERO keys: `observation/<camera>_image` (`observation/wrist_image`), and `image` /
     `observation/image` for a one-camera model's camera or the camera named `primary` (a key that is another
     camera's own name stays that camera's). Any image size is accepted (bicubic resize to
     `training_obs_image_size`).
   * instruction: `prompt` or `instruction`, a string or one string per sample (a single string is broadcast);
     without either, the server's `--default-prompt` when set.
   * state: `state`, `observation/state` or `observation.state`, float [S] or [B, S]; required when the model takes
     one (`state_dim` > 0: actions predicted without it would be off-distribution) or when the embodiment's
     statistics record relative actions (`action_mode` rel / delta: they are made absolute from it), otherwise
     optional (then only `delta_dims` post-processing reads it).
   * `unnorm_key` (optional): which embodiment's statistics decode the actions.
   Unrelated keys are ignored, but one field sent under two names (`instruction` and `prompt`, two state keys, two
   names of a camera, an `images` map beside flat camera keys) is an error, as are `examples`, `batch_images` or
   `unnorm_key` beside a `payload` (the StarVLA form below).
2. StarVLA form: `{"type": "infer" | "predict_action" | "ping", "request_id": ..., "payload": {"examples": [{"image":
   [uint8 HWC per camera], "lang": str, "state"?: [S]}], "unnorm_key": ...}}`, or the payload's keys at top level;
   the 2025 form `{"batch_images": [[uint8 HWC per camera]] * B, "instructions": [str] * B, "state"?: [B, S]}` too
   (`state` as in the openpi form: required when the model takes one).
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
     `action[t, i] = state[j] + sum(action[:t+1, i])`; the observation must then carry its state. For checkpoints
     whose statistics do not say so: an embodiment whose statistics record `action_mode` rel / delta already gets
     absolute actions from the policy, and a request for it with `delta_dims` set is refused.
   * `gripper_dims`, `gripper_threshold` (0.5), `gripper_low` (0.0), `gripper_high` (1.0): binarise to high / low.
   * `execute_steps` N: keep only the first N steps of each chunk.
   Server-wide defaults come from `--execute-steps`, `--delta-dims`, ... flags.

Errors never close the connection. An openpi-form request gets a text frame holding `"<field>: <what is wrong>"`,
as openpi's own server sends its errors (openpi-client raises it: `RuntimeError("Error in inference server: ...")`);
a StarVLA-form one gets `{"status": "error", "ok": False, "request_id": ..., "error": {"message": ...}}`, and a frame
that cannot be read at all (not msgpack, not a map) the binary map `{"error": "<field>: <what is wrong>"}`. Frames
over `max_frame_bytes` are refused by websockets itself (close code 1009, the frame is never read); arrays over
`max_array_bytes` (or that do not decode) get error replies in their request's form, requests over
`max_request_rows` samples too, and so does a request whose predicted chunk is not finite (FAST's undecodable
chunks): no client is sent NaN.

HTTP: `GET /healthz` → 200 "OK" (no key needed). With an API key set, the upgrade needs `Authorization: Bearer KEY`,
`Authorization: Api-Key KEY` (openpi-client's form) or `x-api-key: KEY`, else HTTP 401.

Micro-batching (`hf_vla.serving.batching`): requests from concurrent clients that can share a `policy.predict` call
are merged, without making a lone client wait. A flow model that attends to prompt padding (`condition_mask` other
than "always") would answer differently beside a longer prompt, so it merges rows of one instruction only (of one
request only when its prompt also holds the state).
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as websocket_serve

from ..normalization import describe_action_mode, is_relative
from .batching import BatchResult, BatchStats, ClientActivity, MicroBatcher
from .msgpack_numpy import decode_arrays, packb, unpack_tree
from .protocol import INFER_TYPES, STARVLA_MARKERS, UNDECODABLE_CHUNK, Limits, PostProcess, Request, RequestParser

logger = logging.getLogger("hf_vla.serving")


# ---------------------------------------------------------------- server


@dataclass
class _Connection:
    postprocess: PostProcess
    prev_total_ms: float | None = None


@dataclass
class ServerOptions:
    api_key: str | None = None
    unnorm_key: str | None = None
    default_prompt: str | None = None  # the instruction of requests that send none (openpi's `default_prompt`)
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
        self.parser = RequestParser(processor, default_key, self.options.limits, self.options.default_prompt)
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
        # every value of a header sent twice (`headers.get` would raise, and the client get HTTP 500, not 401)
        candidates = list(headers.get_all("x-api-key"))
        for value in headers.get_all("Authorization"):
            scheme, _, credential = value.partition(" ")
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
                reply = await self._reply_unless_closed(websocket, frame, connection)
                if reply is None:  # the client left while its request waited: nothing to send
                    break
                await websocket.send(reply if isinstance(reply, str) else self._pack(reply))
                activity.replied(loop.time())
        except websockets.ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection handler failed")
        finally:
            self._connections -= 1
            self.batcher.clients.discard(activity)

    async def _reply_unless_closed(self, websocket: ServerConnection, frame, connection: _Connection):
        """The reply, or None when the connection closes first: the request is then withdrawn from the batcher's
        queue (its future cancelled), so a client that left costs no prediction."""
        work = asyncio.ensure_future(self._reply(frame, connection))
        closed = asyncio.ensure_future(websocket.wait_closed())
        done, _ = await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            closed.cancel()
            return work.result()
        work.cancel()
        return None

    @staticmethod
    def _pack(reply: dict) -> bytes:
        try:
            return packb(reply)
        except Exception as error:  # e.g. an echoed request_id that cannot be packed again
            return packb({"error": f"reply: cannot be packed ({error})"})

    async def _reply(self, frame: bytes | str, connection: _Connection) -> dict | str:
        """The reply map, or an openpi-form request's error message (sent as a text frame)."""
        start = time.perf_counter()
        starvla, openpi, request_id = False, False, None
        try:
            if isinstance(frame, str):
                raise ValueError("frame: text frames are not accepted; send a binary msgpack map")
            tree = unpack_tree(frame)
            if isinstance(tree, dict):  # the form is known before the arrays are decoded: their errors answer in it
                starvla = any(key in tree for key in STARVLA_MARKERS)
                openpi, request_id = not starvla, tree.get("request_id")
            message = decode_arrays(tree, self.options.limits.max_array_bytes)
            if not isinstance(message, dict):
                raise ValueError(f"message: expected a map, got {type(message).__name__}")
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
            return str(error) if openpi else _error(str(error), starvla, request_id)
        except Exception as error:
            logger.exception("request failed")
            message = f"internal error: {type(error).__name__}: {error}"
            return message if openpi else _error(message, starvla, request_id)

    async def _infer(self, request: Request, postprocess: PostProcess) -> tuple[np.ndarray, np.ndarray, BatchResult]:
        """Post-processed actions and the normalised model output (cut to the same `execute_steps`, otherwise
        untouched), each `[B, T, D]` (`[T, D]` for an unbatched request), and the batch's timing."""
        if postprocess.needs_state and any(row.state is None for row in request.rows):
            raise ValueError("state: missing; this connection's delta_dims post-processing needs the state")
        key = request.rows[0].unnorm_key
        processor = self.policy.processor
        mode = processor.embodiment_action_mode(key)
        if postprocess.delta_dims and is_relative(mode):
            raise ValueError(f"delta_dims: embodiment {key!r} was trained on {describe_action_mode(mode)} actions, "
                             "which the policy already returns absolute; configure delta_dims=None for it")
        action_width, state_width = processor.embodiment_dims(key)
        if (action_width, state_width) != (processor.action_dim, processor.state_dim):
            try:  # a padded embodiment's chunks and states have its own, narrower widths
                postprocess.check(processor.action_horizon, action_width, state_width)
            except ValueError as error:
                raise ValueError(f"{error} (embodiment {key!r}'s own width)") from None
        result = await self.batcher.predict(request.rows)
        undecoded = [i for i, actions in enumerate(result.actions) if not np.isfinite(actions).all()]
        if undecoded:  # a robot must never receive NaN as a command; FAST marks chunks it cannot decode with NaN
            raise RuntimeError(f"actions: the model's output for sample(s) {undecoded} {UNDECODABLE_CHUNK} (e.g. "
                               "FAST tokens that do not decode); nothing to execute")
        chunks = [postprocess.apply(actions, row.state) for actions, row in zip(result.actions, request.rows)]
        actions = np.stack(chunks).astype(np.float32, copy=False)
        if not np.isfinite(actions).all():  # e.g. a delta added to a state near float32's limit
            raise ValueError("actions: post-processing (delta_dims) made non-finite actions; check the state sent")
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
            # each embodiment's own widths (a cross-embodiment mixture pads smaller ones to action_dim / state_dim)
            "embodiment_dims": {key: dict(zip(("action_dim", "state_dim"), processor.embodiment_dims(key)))
                                for key in sorted(processor.norm_stats or {})},  # fmt: skip
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

    `options`: unnorm_key, default_prompt, batching, batch_window_ms, max_batch, postprocess (a `PostProcess`), limits
    (a `Limits`).
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


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0..65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected 0..65535 (0: any free port), got {port}")
    return port


def _device(text: str) -> str:
    """A torch device this machine has, found before the model loads (not as a traceback from `model.to`)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if device.type == "cpu" or not hasattr(backend, "is_available"):
        return text
    if not backend.is_available():
        raise argparse.ArgumentTypeError(f"expected a device this machine has, got {text!r} (torch finds no "
                                         f"{device.type} device)")
    if device.index is not None and device.index >= backend.device_count():
        raise argparse.ArgumentTypeError(f"expected a {device.type} index below {backend.device_count()} (the "
                                         f"devices this machine has), got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` options, for `main` and for an `hf-vla serve` sub-command."""
    parser.add_argument("model_path", nargs="?", metavar="MODEL", help="model directory or hub id")
    parser.add_argument("--model", help="the same, as an option (default: the embedded default model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=8000, help="0..65535 (0: any free port)")
    parser.add_argument("--api-key", default=os.environ.get("HF_VLA_API_KEY"),
                        help="require this key (default: $HF_VLA_API_KEY; none = open)")
    parser.add_argument("--unnorm-key", help="default embodiment statistics for decoding actions")
    parser.add_argument("--default-prompt", help="the instruction of requests that send none (openpi's ALOHA sim)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", type=_device, help="torch device, e.g. cuda")
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
        default_prompt=args.default_prompt,
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
    option = "MODEL" if args.model_path else "--model"
    args.model = args.model or args.model_path
    if args.model is None:
        from ..defaults import default_model_dir

        args.model = default_model_dir()
        print("note: serving the embedded default model (a tiny policy trained on Meta-World)", file=sys.stderr)
    from ..cli import load_policy

    options = options_from_args(args)
    loading = {key: options.pop(key) for key in ("dtype", "device", "pack_linear_weights")}
    policy = load_policy(args.model, option, **loading)
    PolicyServer(policy, ckpt_path=str(args.model), **options).serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="hf-vla serve", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: its message, not a traceback (as `hf-vla serve`)
        parser.exit(2, f"hf-vla serve: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
