"""Micro-batching for the policy server: requests from concurrent clients are queued; the batcher takes the first and
keeps collecting for up to `batch_window_ms` or `max_batch` samples, but only while another connection is expected
to send within the window (judged from each connection's usual gap between a reply and its next request), so a lone
client or one beside idle connections never waits. It groups samples that can share a call (same unnorm key, camera
image sizes and state presence), runs one `policy.predict` per group on a worker thread and hands every client its
own rows. Models that sample noise (flow-matching heads) draw it per call, so their batched results differ from
single calls by that noise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .protocol import Row

logger = logging.getLogger("hf_vla.serving")
RHYTHM_GAPS = 5  # a connection's request rhythm is the median of its last gaps


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
    think_s: float | None = None  # median of the recent gaps between a reply and the next request
    pending: bool = False
    # a median, not a running mean: one long pause (an episode reset) would otherwise keep a client looking idle,
    # and unbatched, for a dozen requests
    gaps: deque = field(default_factory=lambda: deque(maxlen=RHYTHM_GAPS))

    def request_arrived(self, now: float) -> None:
        self.gaps.append(now - self.last_reply)
        self.think_s = float(np.median(self.gaps))
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
        # A flow model that attends to the prompt's padding (condition_mask "never" / "training": StarVLA checkpoints
        # from before its masking fix) answers differently next to a longer prompt: it batches rows of one prompt
        # length only, i.e. of one instruction (with same-sized images), or, when the state is written into the
        # prompt too, a request's own rows.
        config = policy.model.config
        self.pads_into_conditions = getattr(config, "condition_mask", "always") != "always"
        self.state_in_prompt = bool(getattr(config, "state_in_prompt", False))
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
                groups[self._group(row, j)].append((j, r, row))
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

    def _group(self, row: Row, job: int) -> tuple:
        if not self.pads_into_conditions:
            return row.group_key()
        return (*row.group_key(), ("request", job) if self.state_in_prompt else row.instruction)

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
        if all(row.state is not None for row in rows):  # the policy decides whether the model reads it
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


if __name__ == "__main__":
    from ..policy import VLAPolicy
    from ..testing import build_tiny_vla, random_observation

    model, processor = build_tiny_vla("oft")
    observation = random_observation(processor, batch_size=1)
    row = Row(tuple(observation["images"][0]), observation["text"][0], observation["state"][0].astype(np.float32),
              None)  # fmt: skip

    async def concurrent_requests(batcher: MicroBatcher, clients: int) -> list[BatchResult]:
        runner = asyncio.create_task(batcher.run())
        try:
            return await asyncio.gather(*(batcher.predict([row]) for _ in range(clients)))
        finally:
            runner.cancel()

    for enabled in (False, True):
        batcher = MicroBatcher(VLAPolicy(model, processor), enabled=enabled, window_ms=20, max_batch=8)
        results = asyncio.run(concurrent_requests(batcher, clients=4))
        batcher.close()
        stats = batcher.stats
        print(f"batching {'on ' if enabled else 'off'}: 4 simultaneous requests → {stats.predict_calls} predict "
              f"call(s), largest batch {stats.largest_batch}, each reply {list(results[0].actions[0].shape)}")
