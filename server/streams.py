"""Camera streams: latest-frame-wins over a pipeline model, shared by gRPC and WebSocket.

Per stream and model, at most one frame is being processed and at most one waits. A newer frame
replaces the waiting one, and the replaced frame is answered as skipped, with its id; a frame
whose batch cannot start before it is `max_frame_age_ms` old is skipped the same way. So a
camera that sends faster than the server answers sees bounded latency, never a growing queue,
and every frame gets exactly one answer: processed, skipped or failed.

Fairness comes from the same rule: each stream has at most one frame in the model's queue, so a
batch holds at most one frame per stream, and a fast stream cannot crowd out a slow one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server import metrics
from server.dataplane import DataPlane
from server.errors import ErrorKind, VolleyError
from server.types import InferenceRequest, InferenceResponse

REPLACED = "replaced by a newer frame"


@dataclass
class FrameAnswer:
    """The one answer a frame gets: a response (processed or skipped) or an error message."""

    id: str
    response: InferenceResponse | None = None
    error: str | None = None

    @property
    def skipped(self) -> bool:
        return self.response is not None and self.response.parameters.get("skipped") is True


Emit = Callable[[FrameAnswer], Awaitable[None]]


@dataclass
class Frame:
    request: InferenceRequest
    arrival_ns: int


@dataclass
class _Slot:
    """One model's frames within one stream."""

    max_age_ns: int
    waiting: Frame | None = None
    running: asyncio.Task | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class FrameStream:
    """The frames of one client stream; answers go to `emit` in the order they are ready."""

    def __init__(self, dataplane: DataPlane, emit: Emit, protocol: str) -> None:
        self._dataplane = dataplane
        self._emit = emit
        self._protocol = protocol
        self._slots: dict[tuple[str, str], _Slot] = {}

    def takes(self, request: InferenceRequest) -> bool:
        """Whether the request's model serves frames latest-frame-wins."""
        return self._dataplane.frame_policy(request.model, request.version) is not None

    async def submit(self, request: InferenceRequest) -> None:
        """Take one frame: run it now, or let it wait (replacing and skipping a waiting one)."""
        frame = Frame(request, time.perf_counter_ns())
        key = (request.model, request.version)
        slot = self._slots.get(key)
        if slot is None:
            policy = self._dataplane.frame_policy(request.model, request.version)
            if policy is None:  # unloaded meanwhile: fail the frame like any request would
                await self._run(None, frame)
                return
            slot = self._slots[key] = _Slot(policy.max_frame_age_ms * 1_000_000)
            slot.idle.set()
            metrics.ACTIVE_STREAMS.labels(request.model).inc()
        if slot.running is None:
            self._start(slot, frame)
            return
        replaced, slot.waiting = slot.waiting, frame
        if replaced is not None:
            await self._skip(replaced, REPLACED)

    async def finish(self) -> None:
        """The client sent its last frame: answer everything taken, then release the state."""
        for slot in list(self._slots.values()):
            await slot.idle.wait()
        self.close()

    def close(self) -> None:
        """The client left: drop waiting frames and cancel running ones at once."""
        for (model, _), slot in self._slots.items():
            slot.waiting = None
            if slot.running is not None:
                slot.running.cancel()
            metrics.ACTIVE_STREAMS.labels(model).dec()
        self._slots.clear()

    def _start(self, slot: _Slot, frame: Frame) -> None:
        slot.idle.clear()
        slot.running = asyncio.create_task(self._run(slot, frame))

    async def _run(self, slot: _Slot | None, frame: Frame) -> None:
        try:
            await self._process(slot, frame)
        finally:
            if slot is not None:
                slot.running = None
                following, slot.waiting = slot.waiting, None
                if following is not None:
                    self._start(slot, following)
                else:
                    slot.idle.set()

    async def _process(self, slot: _Slot | None, frame: Frame) -> None:
        request, model = frame.request, frame.request.model
        deadline = frame.arrival_ns + slot.max_age_ns if slot is not None else None
        try:
            response = await self._dataplane.infer(request, self._protocol, deadline)
        except VolleyError as exc:
            if exc.kind is ErrorKind.TIMEOUT and slot is not None:
                age_ms = slot.max_age_ns // 1_000_000
                await self._skip(frame, f"older than max_frame_age_ms ({age_ms} ms) at batch time")
                return
            if slot is not None:  # a model that exists: never label series with made-up names
                metrics.FRAMES.labels(model, "failed").inc()
            await self._emit(FrameAnswer(request.id, error=f"frame '{request.id}': {exc.message}"))
            return
        done = time.perf_counter_ns()
        params = response.parameters
        # How old the frame was when its batch started: its wait here, decode, then the queue.
        waited_ns = done - frame.arrival_ns - params.get("total_us", 0) * 1000
        age_us = waited_ns // 1000 + params.get("decode_us", 0) + params.get("queue_us", 0)
        params["total_us"] = (done - frame.arrival_ns) // 1000
        metrics.FRAME_AGE.labels(model).observe(age_us / 1e6)
        metrics.FRAME_LATENCY.labels(model).observe((done - frame.arrival_ns) / 1e9)
        metrics.FRAMES.labels(model, "processed").inc()
        await self._emit(FrameAnswer(request.id, response=response))

    async def _skip(self, frame: Frame, reason: str) -> None:
        request = frame.request
        params: dict = {"skipped": True, "skip_reason": reason}
        if "capture_ts" in request.parameters:
            params["capture_ts"] = request.parameters["capture_ts"]
        version = request.version or ""
        response = InferenceResponse(request.model, version, request.id, [], params)
        metrics.FRAMES.labels(request.model, "skipped").inc()
        await self._emit(FrameAnswer(request.id, response=response))
