"""Dynamic batching of one model version over its instances.

The rule (Triton's, see docs/batching.md):
- Requests queue in arrival order. A batch is formed only when an instance is free, so while
  every instance is busy the queue grows and the next batch is larger.
- A batch takes the oldest request and then, in order, every request whose non-batch shapes
  equal it, while the rows fit in `max_batch_size`; requests of other shapes wait for a later batch.
- It is released at once when it is full or reaches a preferred size; otherwise it waits for
  more requests until the oldest request has waited `max_queue_delay_us` (0 = never wait).
- A request whose queue timeout passes before its batch starts fails with a timeout; a full
  queue rejects new requests at once. A failed batch fails each of its requests with the reason.

Inference runs in a thread pool (ONNX Runtime releases the GIL), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.config import ModelConfig
from server.errors import ErrorKind, VolleyError
from server.runtime import OnnxInstance
from server.stats import ModelStats

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


@dataclass(eq=False)
class Pending:
    """A request waiting for, or running in, a batch."""

    inputs: Tensors
    rows: int
    key: tuple
    future: asyncio.Future
    arrival_ns: int
    deadline_ns: int | None
    started: bool = field(default=False)


@dataclass
class Batch:
    """Requests released together, and why they were released."""

    requests: list[Pending]
    rows: int
    reason: str


class Batcher:
    """Queues requests for one model version and runs them in batches on its instances."""

    def __init__(
        self, config: ModelConfig, instances: list[OnnxInstance], stats: ModelStats
    ) -> None:
        self.config = config
        self.stats = stats
        self._free = deque(instances)
        self._busy = 0
        self._queue: deque[Pending] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._executor = ThreadPoolExecutor(
            max_workers=len(instances), thread_name_prefix=f"infer-{config.name}"
        )
        batching = config.dynamic_batching
        self._max_rows = max(config.max_batch_size, 1) if batching else 1
        self._delay_ns = batching.max_queue_delay_us * 1000 if batching else 0
        self._preferred = set(batching.preferred_batch_sizes) if batching else set()
        self._max_queue = batching.max_queue_size if batching else 0
        self._default_timeout_us = batching.default_timeout_us if batching else 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    async def infer(self, inputs: Tensors, rows: int, timeout_us: int = 0) -> Tensors:
        """Queue a validated request and wait for its own rows of the batch outputs."""
        if self._draining:
            raise VolleyError(ErrorKind.UNAVAILABLE, f"model '{self.config.name}' is unloading")
        if self._max_queue and len(self._queue) >= self._max_queue:
            raise VolleyError(
                ErrorKind.QUEUE_FULL,
                f"model '{self.config.name}' queue is full ({self._max_queue} requests queued)",
            )
        now = time.perf_counter_ns()
        timeout_us = timeout_us or self._default_timeout_us
        key = tuple(a.shape[1:] for a in inputs.values()) if self.config.batching else ()
        pending = Pending(
            inputs=inputs,
            rows=rows,
            key=key,
            future=asyncio.get_running_loop().create_future(),
            arrival_ns=now,
            deadline_ns=now + timeout_us * 1000 if timeout_us else None,
        )
        self._queue.append(pending)
        self._idle.clear()
        self.stats.queue_depth.inc()
        self._wakeup.set()
        try:
            if pending.deadline_ns is None:
                outputs = await pending.future
            else:
                outputs = await self._wait_with_timeout(pending, timeout_us)
        except asyncio.CancelledError:
            self._forget(pending)
            raise
        except VolleyError:
            self.stats.record_failure(time.perf_counter_ns() - now)
            raise
        self.stats.record_success(time.perf_counter_ns() - now)
        return outputs

    async def _wait_with_timeout(self, pending: Pending, timeout_us: int) -> Tensors:
        """Wait for the result; past the deadline a still-queued request fails with a timeout.

        The timeout is a queue timeout (as in Triton): once a batch has started, its requests
        are answered even if the batch finishes after their deadline.
        """
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_us / 1e6)
        except TimeoutError:
            if pending.started:
                return await pending.future
            self._forget(pending)
            raise VolleyError(
                ErrorKind.TIMEOUT,
                f"request timed out after {timeout_us} us in the queue of model "
                f"'{self.config.name}'",
            ) from None

    def _forget(self, pending: Pending) -> None:
        """Take a request that nobody waits for any more out of the queue."""
        if not pending.started:
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            self.stats.queue_depth.dec()
            self._check_idle()

    async def drain(self) -> None:
        """Refuse new requests, run everything queued without waiting, then stop."""
        self._draining = True
        self._wakeup.set()
        await self._idle.wait()
        self._task.cancel()
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        # One long-lived task per model version; it only ever waits on events, never polls.
        while True:
            while not self._free or not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._form_batch()
            if batch is None:
                continue
            instance = self._free.popleft()
            self._busy += 1
            asyncio.get_running_loop().create_task(self._execute(batch, instance))

    async def _form_batch(self) -> Batch | None:
        """Pick the next batch, waiting up to the queue delay for it to grow."""
        while True:
            self._expire(time.perf_counter_ns())
            if not self._queue:
                return None
            picked, rows = self._pick()
            reason = self._release_reason(rows)
            now = time.perf_counter_ns()
            if reason is None:
                release_at = self._queue[0].arrival_ns + self._delay_ns
                deadlines = [p.deadline_ns for p in self._queue if p.deadline_ns is not None]
                wake_at = min([release_at, *deadlines])
                if now < wake_at:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), (wake_at - now) / 1e9)
                    continue
                reason = "delay" if now >= release_at else None
                if reason is None:
                    continue
            for pending in picked:
                pending.started = True
            kept = set(map(id, picked))
            self._queue = deque(p for p in self._queue if id(p) not in kept)
            self.stats.queue_depth.dec(len(picked))
            for pending in picked:
                self.stats.record_queue(now - pending.arrival_ns)
            return Batch(picked, rows, reason)

    def _pick(self) -> tuple[list[Pending], int]:
        """The oldest request plus later ones of the same shapes, while the rows fit."""
        first = self._queue[0]
        picked, rows = [first], first.rows
        for pending in list(self._queue)[1:]:
            if rows >= self._max_rows:
                break
            if pending.key != first.key:
                continue
            if rows + pending.rows > self._max_rows:
                break
            picked.append(pending)
            rows += pending.rows
        return picked, rows

    def _release_reason(self, rows: int) -> str | None:
        if self._draining:
            return "drain"
        if rows >= self._max_rows:
            return "full"
        if rows in self._preferred:
            return "preferred"
        if self._delay_ns == 0:
            return "immediate"
        return None

    def _expire(self, now: int) -> None:
        """Fail queued requests whose queue timeout has passed."""
        expired = [p for p in self._queue if p.deadline_ns is not None and now >= p.deadline_ns]
        for pending in expired:
            self._queue.remove(pending)
            self.stats.queue_depth.dec()
            if not pending.future.done():
                pending.future.set_exception(
                    VolleyError(
                        ErrorKind.TIMEOUT,
                        f"request timed out in the queue of model '{self.config.name}'",
                    )
                )

    async def _execute(self, batch: Batch, instance: OnnxInstance) -> None:
        loop = asyncio.get_running_loop()
        try:
            outputs, timings = await loop.run_in_executor(
                self._executor, run_batch, instance, batch, self.config.batching
            )
        except Exception as exc:
            log.exception(
                "batch failed",
                extra={"event": "batch_failed", "model": self.config.name, "rows": batch.rows},
            )
            error = VolleyError(ErrorKind.INTERNAL, f"inference failed: {exc}")
            for pending in batch.requests:
                if not pending.future.done():
                    pending.future.set_exception(error)
        else:
            self.stats.record_batch(batch.rows, len(batch.requests), *timings, batch.reason)
            for pending, result in zip(batch.requests, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        finally:
            self._free.append(instance)
            self._busy -= 1
            self._wakeup.set()
            self._check_idle()

    def _check_idle(self) -> None:
        if not self._queue and self._busy == 0:
            self._idle.set()


def run_batch(
    instance: OnnxInstance, batch: Batch, batching: bool
) -> tuple[list[Tensors], tuple[int, int, int]]:
    """Concatenate, run and split one batch (in a worker thread); returns per-request outputs."""
    t0 = time.perf_counter_ns()
    requests = batch.requests
    if len(requests) == 1:
        inputs = requests[0].inputs
    else:
        inputs = {
            name: np.concatenate([p.inputs[name] for p in requests]) for name in requests[0].inputs
        }
    t1 = time.perf_counter_ns()
    outputs = instance.run(inputs)
    t2 = time.perf_counter_ns()
    if len(requests) == 1:
        split = [outputs]
    else:
        split = []
        offset = 0
        for pending in requests:
            end = offset + pending.rows
            split.append({name: value[offset:end] for name, value in outputs.items()})
            offset = end
    if batching:
        for name, value in outputs.items():
            if value.shape[0] != batch.rows:
                raise RuntimeError(
                    f"output '{name}' has {value.shape[0]} rows for a batch of {batch.rows}"
                )
    t3 = time.perf_counter_ns()
    return split, (t1 - t0, t2 - t1, t3 - t2)
