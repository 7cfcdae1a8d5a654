"""Messages between the supervisor of `volley serve --workers N` and its workers.

One JSON object a line over a Unix socket in the supervisor's private (0700) directory: a
connection carries one request and its answer. A `VolleyError` travels as
`{"error": {"kind", "message"}}` and is raised again on the other side, so a client gets the
same status from any worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from server.errors import ErrorKind, VolleyError

CONTROL_SOCKET = "control.sock"  # the supervisor's, in its directory
RATE_LIMITS = "rate-limits"  # the workers' shared table of rate limit buckets, beside it
CONNECTION_COUNTS = "connections"  # each worker's connections, for the supervisor's hand-offs


def worker_socket(directory: Path, index: int) -> Path:
    """Where worker `index` takes the supervisor's commands."""
    return directory / f"worker-{index}.sock"


LINE_LIMIT = 1 << 26  # statistics of many models, or a load request's config override

Handler = Callable[[dict], Awaitable[dict]]


async def call(path: Path, message: dict) -> dict:
    """Send `message` to the listener at `path` and return its answer (raise its error)."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
    try:
        writer.write(orjson.dumps(message) + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ConnectionError(f"{path} closed without answering")
    answer = orjson.loads(line)
    if "error" in answer:
        raise VolleyError(ErrorKind[answer["error"]["kind"]], answer["error"]["message"])
    return answer


async def listen(path: Path, handler: Handler) -> asyncio.Server:
    """Answer each request sent to `path` with `handler` (its VolleyError as an error answer)."""

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                answer = await handler(orjson.loads(line))
            except VolleyError as exc:
                answer = {"error": {"kind": exc.kind.name, "message": exc.message}}
            writer.write(orjson.dumps(answer) + b"\n")
            await writer.drain()
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()

    return await asyncio.start_unix_server(connected, path=str(path), limit=LINE_LIMIT)
