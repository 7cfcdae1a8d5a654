"""Dynamic batching of one model version over its instances.

The rule (Triton's; docs/batching.md says it for users):
- Requests queue in arrival order. Each instance has one thread that pulls a batch only when it
  is free, so while every instance is busy the queue grows and the next batch is larger.
- A batch takes the oldest request and then, in order, every request whose non-batch shapes
  equal it, while the rows fit in `max_batch_size`; requests of other shapes wait for a later batch.
- It is released at once when it is full or reaches a preferred size; otherwise it waits for
  more requests until the oldest request has waited `max_queue_delay_us` (0 = never wait).
- A request whose queue timeout passes before its batch starts fails with a timeout; a full
  queue rejects new requests at once. A failed batch fails each of its requests with the reason.

Requests arrive on the event loop; batches form and run on the instance threads (ONNX Runtime
releases the GIL), and each finished batch hands its results back to the loop in one callback.
With `solo_session`, a batch that starts while no other batch runs goes to a spare session with
all the usable CPUs' threads: alone, a batch finishes sooner on every core; under load each
instance runs on its own share, and a thread preempted by other work stalls only its own batch.
One exception: a one-row request that is the only request the server holds (`server.held`) and
finds the batcher idle (nothing queued or running, no queue delay) runs at once on the loop when
the model's one-row runs have been measured faster than `inline_max_us`. For a tiny model the
two thread hand-offs cost more than the run itself, and there is nothing to batch it with.
With `inline_batches` (CPU only) the same holds under load: requests queued while no batch runs
on an instance thread are taken by a loop callback, one batch per loop pass, so what the loop
read in one pass runs as one batch without waking a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.config import DEFAULT_MAX_QUEUE_SIZE, ModelConfig
from server.errors import ErrorKind, VolleyError, internal, new_request_id, raise_if_set
from server.held import HELD
from server.runtime import DEVICE_PROVIDERS, OnnxInstance
from server.stats import ModelStats
from server.tracing import Trace

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]

# Inline runs need this many measured one-row batches first; the measure is a moving average
# (each new batch weighs 1/8), so a model that slows down stops running inline.
INLINE_MIN_RUNS = 16
INLINE_WEIGHT = 0.125
# Triton's names for when a batch started, had its inputs ready, had run, and was split up
COMPUTE_STAMPS = ("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END")


@dataclass(eq=False, slots=True)
class Pending:
    """A request waiting for, or running in, a batch."""

    inputs: Tensors
    rows: int
    key: tuple
    future: asyncio.Future
    arrival_ns: int
    deadline_ns: int | None
    started: bool = field(default=False)
    start_ns: int = 0  # when its batch started
    compute_ns: int = 0  # how long its batch ran
    trace: Trace | None = None  # the request's, when it is traced


@dataclass
class Batch:
    """Requests released together, when, and why."""

    requests: list[Pending]
    rows: int
    reason: str
    start_ns: int
    solo: bool = False  # no other batch was running when it started: the solo session takes it


class Batcher:
    """Queues requests for one model version and runs them in batches on its instances."""

    def __init__(
        self,
        config: ModelConfig,
        instances: list[OnnxInstance],
        stats: ModelStats,
        label: str | None = None,
    ) -> None:
        """`label` names the instance threads (default: the model's name)."""
        self.config = config
        self.stats = stats
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # taken directly where nothing waits (notify needs only it)
        self._cond = threading.Condition(self._lock)
        self._batching = config.batching
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0  # rows of the requests in `_queue`
        self._running = 0
        self._draining = False
        self._stopped = False
        self._idle = asyncio.Event()
        self._idle.set()
        batching = config.dynamic_batching
        self._max_rows = max(config.max_batch_size, 1) if batching else 1
        self._delay_ns = batching.max_queue_delay_us * 1000 if batching else 0
        self._preferred = set(batching.preferred_batch_sizes) if batching else set()
        self._max_queue = batching.max_queue_size if batching else DEFAULT_MAX_QUEUE_SIZE
        self._default_timeout_us = batching.default_timeout_us if batching else 0
        self._hold_until = 0  # test hook, see `hold_until_queued`
        self._instances = [i for i in instances if not i.solo]
        self._solo = next((i for i in instances if i.solo), None)
        self._inline_ns = config.inline_max_us * 1000 if self._delay_ns == 0 else 0
        on_cpu = all(i.provider not in DEVICE_PROVIDERS for i in self._instances)
        self._inline_batches = config.inline_batches and on_cpu
        self._loop_pass_due = False  # a `_run_on_loop` callback is scheduled
        self._one_row_ns = 0.0  # moving average of one-row batches' compute time
        self._one_row_runs = 0
        stats.count_queue(self)
        self._threads = [
            threading.Thread(
                target=self._serve,
                args=(instance,),
                name=f"batcher-{label or config.name}-{instance.index}",
                daemon=True,
            )
            for instance in self._instances
        ]
        for thread in self._threads:
            thread.start()

    @property
    def max_queue(self) -> int:
        """Requests it queues before refusing more (`max_queue_size`)."""
        return self._max_queue

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def hold_until_queued(self, count: int) -> None:
        """Test hook: form no batch until `count` requests are queued (or a drain starts).

        After that the rule above applies unchanged, so a test can build a known queue without
        sleeping (Triton's tests do the same with TRITONSERVER_DELAY_SCHEDULER). Unused, it
        costs one integer test per batch.
        """
        with self._cond:
            self._hold_until = count
            self._cond.notify_all()

    async def infer(self, inputs: Tensors, rows: int, timeout_us: int = 0) -> Tensors:
        """Queue a validated request and wait for its own rows of the batch outputs."""
        outputs, _, _ = await self.infer_timed(inputs, rows, timeout_us)
        return outputs

    async def infer_timed(
        self, inputs: Tensors, rows: int, timeout_us: int = 0, trace: Trace | None = None
    ) -> tuple[Tensors, int, int]:
        """`infer`, also returning how long the request queued and its batch ran (ns); a
        `trace` gets the queue and compute timestamps."""
        now = time.perf_counter_ns()
        timeout_us = timeout_us or self._default_timeout_us
        key = tuple([a.shape[1:] for a in inputs.values()]) if self._batching else ()
        pending = Pending(
            inputs=inputs,
            rows=rows,
            key=key,
            future=self._loop.create_future(),
            arrival_ns=now,
            deadline_ns=now + timeout_us * 1000 if timeout_us else None,
        )
        if trace is not None:
            pending.trace = trace
            trace.stamp("QUEUE_START", now)
        with self._lock:
            raise_if_set(self.refusal())
            inline = self._runs_inline(rows)
            if inline:
                pending.started = True
                self._running += 1
            else:
                if self._batches_on_loop(pending):
                    if not self._loop_pass_due:
                        self._loop_pass_due = True
                        self._loop.call_soon(self._run_on_loop)
                elif self._wakes_a_thread(pending):
                    self._cond.notify()
                self._queue.append(pending)
                self._queued_rows += rows
        self._idle.clear()
        if inline:  # answered before the await below (which then does not suspend)
            self._run_here(Batch([pending], rows, "inline", now))
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
        return outputs, pending.start_ns - pending.arrival_ns, pending.compute_ns

    def refusal(self) -> VolleyError | None:
        """The error a new request gets now (unloading, or a full queue), else None.

        Read without the lock, it is a hint that lets a front end refuse before decoding."""
        if self._draining:
            return VolleyError(ErrorKind.UNAVAILABLE, f"model '{self.config.name}' is unloading")
        if len(self._queue) >= self._max_queue:
            return VolleyError(
                ErrorKind.QUEUE_FULL,
                f"model '{self.config.name}' queue is full ({self._max_queue} requests queued)",
            )
        return None

    def _runs_inline(self, rows: int) -> bool:
        """Whether a new request runs at once on the loop (with the lock held): one row, an idle
        batcher, one-row runs measured faster than `inline_max_us`, and no other request held
        anywhere in the server (`server.held`). Nothing else can start meanwhile: requests join
        only from the loop, which is busy with this one.

        The last condition matters: an inline request is answered before the loop reads the
        next, so under load every request would find the batcher idle, and the loop would run
        them one by one instead of batching them on the instance thread.
        """
        return (
            rows == 1
            and HELD.count <= 1
            and self._measured_fast()
            and not self._queue
            and self._running == 0
            and self._hold_until == 0
        )

    def _batches_on_loop(self, pending: Pending) -> bool:
        """Whether a request that cannot run inline is left to a loop callback rather than an
        instance thread (with the lock held): `inline_batches`, one-row runs measured fast, no
        batch running on a thread (it takes the queue when it is done) and no queue timeout or
        test hook (those keep the threads' rule)."""
        return (
            self._inline_batches
            and self._running == 0
            and self._measured_fast()
            and pending.deadline_ns is None
            and self._hold_until == 0
        )

    def _run_on_loop(self) -> None:
        """One batch from the queue, run here on the loop (see `inline_batches`); another pass is
        scheduled while requests remain. Nothing is taken while a thread runs a batch."""
        with self._lock:
            self._loop_pass_due = False
            if self._running or not self._queue or self._stopped:
                return
            picked, rows = self._pick()
            self._take(picked, rows)
            self._running += 1
            if self._queue:
                self._loop_pass_due = True
                self._loop.call_soon(self._run_on_loop)
        self._run_here(Batch(picked, rows, "inline", time.perf_counter_ns()))

    def _measured_fast(self) -> bool:
        """Whether enough one-row runs were measured and they average under `inline_max_us`
        (never with a queue delay: `_inline_ns` is 0 then)."""
        return self._one_row_runs >= INLINE_MIN_RUNS and self._one_row_ns < self._inline_ns

    def _run_here(self, batch: Batch) -> None:
        """Run `batch` on the event loop's own thread and answer its requests at once."""
        callback, args = self._execute(self._instances[0], batch)
        callback(*args)

    def _wakes_a_thread(self, pending: Pending) -> bool:
        """Whether a new request can change what a waiting instance thread does (with the lock
        held, before it is queued): only then is one woken, so a batch costs its threads a
        wake-up or two rather than one per request.

        A thread sleeps either on an empty queue (any request is news) or until the oldest
        request's delay runs out (news only if the batch may now be full or at a preferred
        size). Requests with a queue timeout and the test hook always wake one.
        """
        return (
            not self._queue
            or self._queued_rows + pending.rows >= self._max_rows
            or bool(self._preferred)
            or pending.deadline_ns is not None
            or self._hold_until > 0
        )

    async def _wait_with_timeout(self, pending: Pending, timeout_us: int) -> Tensors:
        """Wait for the result; past the deadline a still-queued request fails with a timeout.

        The timeout is a queue timeout (as in Triton): once a batch has started, its requests
        are answered even if the batch finishes after their deadline. One timer per request
        (not `asyncio.wait_for`, which costs two more futures and a task switch).
        """
        timer = self._loop.call_later(timeout_us / 1e6, self._deadline, pending, timeout_us)
        try:
            return await pending.future
        finally:
            timer.cancel()

    def _deadline(self, pending: Pending, timeout_us: int) -> None:
        if not pending.future.done() and self._forget(pending):
            pending.future.set_exception(self._timeout_error(timeout_us))

    def _timeout_error(self, timeout_us: int) -> VolleyError:
        return VolleyError(
            ErrorKind.TIMEOUT,
            f"request timed out after {timeout_us} us in the queue of model '{self.config.name}'",
        )

    def _forget(self, pending: Pending) -> bool:
        """Take a request nobody waits for out of the queue; False if its batch has started."""
        with self._lock:
            if pending.started:
                return False
            try:
                self._queue.remove(pending)
            except ValueError:
                return False
            self._queued_rows -= pending.rows
        self._check_idle()
        return True

    async def drain(self) -> None:
        """Refuse new requests, run everything queued without waiting, then stop the threads."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        await self._idle.wait()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        await asyncio.to_thread(lambda: [t.join() for t in self._threads])

    def abort(self, error: VolleyError) -> None:
        """Fail every queued request with `error` and stop; running batches finish unobserved."""
        with self._cond:
            queued, self._queue = list(self._queue), deque()
            self._queued_rows = 0
            self._draining = self._stopped = True
            self._cond.notify_all()
        for pending in queued:
            if not pending.future.done():
                pending.future.set_exception(error)

    # --- instance threads -------------------------------------------------------------------

    def _serve(self, instance: OnnxInstance) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            runner = self._solo if batch.solo else instance
            callback, args = self._execute(runner, batch)
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop closed under an aborted drain: nobody waits
                return

    def _execute(self, instance: OnnxInstance, batch: Batch) -> tuple[Callable, tuple]:
        """Run `batch`; the loop callback that answers its requests, and its arguments."""
        try:
            outputs, stamps = run_batch(instance, batch, self.config.batching)
        except Exception:  # ORT raises many types; each fails the batch, not the thread
            request_id = new_request_id()
            log.exception(
                "batch failed",
                extra={
                    "event": "batch_failed",
                    "model": self.config.name,
                    "rows": batch.rows,
                    "request_id": request_id,
                },
            )
            error = internal(f"model '{self.config.name}' failed on this batch", request_id)
            return self._fail, (batch, error)
        return self._finish, (batch, outputs, stamps)

    def _next_batch(self) -> Batch | None:
        """Block until a batch is due (or the batcher stops) and take it out of the queue."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                now = time.perf_counter_ns()
                self._expire(now)
                if not self._queue:
                    self._cond.wait()
                    continue
                if self._hold_until:
                    if len(self._queue) < self._hold_until and not self._draining:
                        self._cond.wait()
                        continue
                    self._hold_until = 0
                    self._cond.notify_all()  # the other instances may take batches too
                picked, rows = self._pick()
                reason = self._release_reason(rows)
                if reason is None:
                    # Hold the lock only while deciding: waiting releases it for new arrivals.
                    release_at = self._queue[0].arrival_ns + self._delay_ns
                    if now < release_at:
                        deadlines = [p.deadline_ns for p in self._queue if p.deadline_ns]
                        wake_at = min([release_at, *deadlines])
                        self._cond.wait(max(wake_at - now, 0) / 1e9)
                        continue
                    reason = "delay"
                self._take(picked, rows)
                if self._queue:  # left behind (other shapes, no room): another thread may start
                    self._cond.notify()
                self._running += 1
                solo = self._solo is not None and self._running == 1
                return Batch(picked, rows, reason, now, solo)

    def _take(self, picked: list[Pending], rows: int) -> None:
        """Mark `_pick`'s requests started and remove them from the queue (lock held)."""
        for pending in picked:
            pending.started = True
        taken = set(map(id, picked))
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        self._queued_rows -= rows

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
        """Fail queued requests whose queue timeout has passed (called with the lock held)."""
        expired = [p for p in self._queue if p.deadline_ns is not None and now >= p.deadline_ns]
        for pending in expired:
            self._queue.remove(pending)
            self._queued_rows -= pending.rows
            self._loop.call_soon_threadsafe(self._expired, pending)

    # --- back on the event loop -------------------------------------------------------------

    def _expired(self, pending: Pending) -> None:
        if not pending.future.done():
            timeout_us = (pending.deadline_ns - pending.arrival_ns) // 1000
            pending.future.set_exception(self._timeout_error(timeout_us))
        self._check_idle()

    def _finish(
        self, batch: Batch, outputs: list[Tensors], stamps: tuple[int, int, int, int]
    ) -> None:
        start, inputs_end, outputs_start, end = stamps
        gather, run, split = inputs_end - start, outputs_start - inputs_end, end - outputs_start
        self.stats.record_batch(batch.rows, len(batch.requests), gather, run, split, batch.reason)
        compute_ns = end - start
        if batch.rows == 1:
            self._one_row_runs += 1
            weight = max(INLINE_WEIGHT, 1 / self._one_row_runs)
            self._one_row_ns += (compute_ns - self._one_row_ns) * weight
        for pending, result in zip(batch.requests, outputs, strict=True):
            pending.start_ns, pending.compute_ns = batch.start_ns, compute_ns
            self.stats.record_queue(batch.start_ns - pending.arrival_ns)
            if pending.trace is not None:
                for name, ns in zip(COMPUTE_STAMPS, stamps, strict=True):
                    pending.trace.stamp(name, ns)
            if not pending.future.done():
                pending.future.set_result(result)
        self._batch_done()

    def _fail(self, batch: Batch, error: VolleyError) -> None:
        for pending in batch.requests:
            if not pending.future.done():
                pending.future.set_exception(error)
        self._batch_done()

    def _batch_done(self) -> None:
        with self._lock:
            self._running -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        with self._lock:
            idle = not self._queue and self._running == 0
        if idle:
            self._idle.set()


def run_batch(
    instance: OnnxInstance, batch: Batch, batching: bool
) -> tuple[list[Tensors], tuple[int, int, int, int]]:
    """Concatenate, run and split one batch; returns per-request outputs and when each stage
    began and the last ended (perf_counter ns: COMPUTE_STAMPS)."""
    t0 = time.perf_counter_ns()
    requests = batch.requests
    inputs = {name: instance.gather(name, [p.inputs[name] for p in requests])
              for name in requests[0].inputs}  # fmt: skip
    t1 = time.perf_counter_ns()
    outputs = instance.run(inputs)
    t2 = time.perf_counter_ns()
    if batching:
        for name, value in outputs.items():
            if value.shape[0] != batch.rows:
                raise RuntimeError(
                    f"output '{name}' has {value.shape[0]} rows for a batch of {batch.rows}"
                )
    if len(requests) == 1:
        split = [outputs]
    else:
        split = []
        offset = 0
        for pending in requests:
            end = offset + pending.rows
            split.append({name: value[offset:end] for name, value in outputs.items()})
            offset = end
    t3 = time.perf_counter_ns()
    return split, (t0, t1, t2, t3)
