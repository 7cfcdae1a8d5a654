"""The WebSocket camera endpoint: `/v2/models/{model}/stream` on the HTTP port.

Binary messages are encoded frames; an optional text message before one sets that frame's `id`
and `capture_ts`, and `parameters` for the rest of the stream. Answers are JSON text messages,
one per frame: detections, skipped (with the reason) or an error naming the frame. Frames are
served latest-frame-wins, exactly as on gRPC `ModelStreamInfer` (`server.streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import numpy as np
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from server.dataplane import DataPlane
from server.protocol.image_body import detections_document
from server.sessions import SHUTTING_DOWN, Session, SessionEnded
from server.streams import FrameAnswer, FrameStream
from server.types import InferenceRequest, InferTensor

POLICY_VIOLATION = 1008
SERVICE_RESTART = 1012  # closing for a restart: the client should reconnect
OUTGOING_LIMIT = 64  # answers waiting for a slow reader; past it, reading frames pauses
META_KEYS = {"id", "capture_ts", "parameters"}


class BadMessage(ValueError):
    """A text message that is not a valid frame header."""


async def serve_frames(websocket: WebSocket, dataplane: DataPlane, model: str) -> None:
    """Run one camera session until the client leaves, or the server shuts down: then the
    frames taken are answered and the session closes with 1012 (service restart), so the
    camera reconnects to a server that is staying up."""
    await websocket.accept()
    if dataplane.frame_policy(model, "") is None:
        await websocket.send_text(_json({"id": None, "error": _refusal(dataplane, model)}))
        await websocket.close(POLICY_VIOLATION)
        return
    outgoing = Outgoing(websocket)
    frames = FrameStream(dataplane, outgoing.put, "websocket")
    session = dataplane.open_session()  # ended on shutdown
    try:
        if not await _read_frames(websocket, session, model, frames, outgoing.put):
            return  # the client left
        if await outgoing.deliver(frames.finish):
            await websocket.close(SERVICE_RESTART, SHUTTING_DOWN)
    finally:
        session.close()
        frames.close()
        await outgoing.close()


class Outgoing:
    """A session's answers on their way to the client: queued, and sent in order by one
    writer task, so a slow reader never blocks the frames' processing (past OUTGOING_LIMIT
    answers waiting, `put` waits, and reading frames pauses with it)."""

    def __init__(self, websocket: WebSocket) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=OUTGOING_LIMIT)
        self._writer = asyncio.create_task(self._write(websocket))
        self._writer.add_done_callback(self._discard)

    async def put(self, answer: FrameAnswer) -> None:
        """Queue a frame's answer (dropped once the client is gone: it can reach no one)."""
        if not self._writer.done():
            await self._queue.put(_json(answer_document(answer)))

    def _discard(self, _: asyncio.Task) -> None:
        """The client is gone: free the queue, so that no `put` waits for room forever."""
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()

    async def deliver(self, answer_taken: Callable[[], Awaitable[None]]) -> bool:
        """Wait for `answer_taken()` (every frame taken has its answer queued), then for every
        answer to be sent. False as soon as the client is gone: no answer can reach it now."""
        flushing = asyncio.create_task(self._flush(answer_taken))
        try:
            done, _ = await asyncio.wait(
                {flushing, self._writer}, return_when=asyncio.FIRST_COMPLETED
            )
            if flushing not in done:
                return False
            flushing.result()  # a bug in the flush raises here
            return True
        finally:
            flushing.cancel()

    async def close(self) -> None:
        """Stop sending: the session is over."""
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer

    async def _flush(self, answer_taken: Callable[[], Awaitable[None]]) -> None:
        await answer_taken()
        await self._queue.join()

    async def _write(self, websocket: WebSocket) -> None:
        while True:
            await websocket.send_text(await self._queue.get())
            self._queue.task_done()


async def _read_frames(
    websocket: WebSocket,
    session: Session,
    model: str,
    frames: FrameStream,
    emit: Callable[[FrameAnswer], Awaitable[None]],
) -> bool:
    """Read the session's messages, handing each frame to `frames`, until the client leaves
    (False) or the server ends the session (True)."""
    parameters: dict = {}
    header: dict = {}
    count = 0
    try:
        while True:
            try:
                message = await session.receive(websocket.receive)
            except SessionEnded:
                return True
            if message["type"] == "websocket.disconnect":
                return False
            if message.get("bytes") is not None:
                count += 1
                frame_id = str(header.pop("id", count))
                extra = {"capture_ts": header.pop("capture_ts")} if "capture_ts" in header else {}
                data = np.array([message["bytes"]], dtype=np.object_)
                request = InferenceRequest(
                    model=model,
                    version="",
                    inputs=[InferTensor("images", "BYTES", (1,), data)],
                    id=frame_id,
                    parameters={**parameters, **extra},
                )
                await frames.submit(request)
            elif message.get("text") is not None:
                try:
                    header = read_header(message["text"])
                except BadMessage as exc:
                    header = {}
                    await emit(FrameAnswer("", error=str(exc)))
                    continue
                parameters.update(header.pop("parameters", {}))
    except WebSocketDisconnect:
        return False


def read_header(text: str) -> dict:
    """Check a text message: a JSON object with optional `id`, `capture_ts`, `parameters`."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"text message is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadMessage("text message must be a JSON object")
    unknown = sorted(set(doc) - META_KEYS)
    if unknown:
        raise BadMessage(f"unknown keys {unknown}; a text message may hold {sorted(META_KEYS)}")
    if "id" in doc and not isinstance(doc["id"], str | int):
        raise BadMessage("'id' must be a string or an integer")
    if "capture_ts" in doc and not isinstance(doc["capture_ts"], int | float | str):
        raise BadMessage("'capture_ts' must be a number or a string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict) or not all(
        isinstance(v, str | int | float | bool) for v in params.values()
    ):
        raise BadMessage("'parameters' must be an object of strings, numbers or booleans")
    return doc


def answer_document(answer: FrameAnswer) -> dict:
    """A frame's answer as the JSON the camera page reads."""
    if answer.response is None:
        return {"id": answer.id or None, "error": answer.error}
    if answer.skipped:
        params = answer.response.parameters
        doc: dict = {"id": answer.id}
        if "capture_ts" in params:
            doc["capture_ts"] = params["capture_ts"]
        return {**doc, "skipped": True, "reason": params.get("skip_reason", "")}
    return {"id": answer.id, **detections_document(answer.response)}


def _refusal(dataplane: DataPlane, model: str) -> str:
    if model not in dataplane.repository.models:
        return f"Request for unknown model: '{model}' is not found"
    if not dataplane.repository.is_ready(model):
        return f"model '{model}' is not ready"
    return f"model '{model}' is not a pipeline model; camera streams need one (e.g. 'detect')"


def _json(doc: dict) -> str:
    return orjson.dumps(doc).decode()
