"""A minimal HTTP/1.1 keep-alive client for prebuilt requests, for load generators that share
the machine with the server (the HTTP twin of bench/h2_client.py).

Each connection is an `asyncio.Protocol` that carries one request at a time: a request is one
write, its answer one callback with the status code. No task, future or stream reader per
request; connections are reused, and opened only when every open one is busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Done = Callable[[int], None]
LOST = 0  # the status reported for a request whose connection closed before it was answered


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, parses its answer's head and body length."""

    def __init__(self, pool: KeepAlivePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.done: Done | None = None
        self.buffer = bytearray()
        self.status = 0
        self.body_left = -1  # -1: still reading the head
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, done: Done) -> None:
        self.done = done
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.body_left < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            del self.buffer[: end + 4]
            self.status = int(head[0].split()[1])
            self.body_left = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.body_left = int(value)
                elif name == b"connection":
                    self.closing = value.strip().lower() == b"close"
        if len(self.buffer) < self.body_left:
            return
        del self.buffer[: self.body_left]
        self.body_left = -1
        done, self.done = self.done, None
        if self.closing:
            self.transport.close()
        else:
            self.pool.idle.append(self)
        if done is not None:
            done(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        done, self.done = self.done, None
        if done is not None:
            done(LOST)


class KeepAlivePool:
    """Sends requests over keep-alive connections to one server; `start(request, done)` calls
    `done(status)` when the answer has come (`LOST` if its connection closed first)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        self.opened: list[_Connection] = []

    async def open(self, count: int) -> None:
        """Open `count` connections ahead of the load."""
        for _ in range(count):
            self.idle.append(await self._connect())

    def start(self, request: bytes, done: Done) -> None:
        """Send `request` on an idle connection, or on a new one once it is open."""
        if self.idle:
            self.idle.pop().send(request, done)
            return

        def send(task: asyncio.Task) -> None:
            if task.exception() is not None:
                done(LOST)
            else:
                task.result().send(request, done)

        asyncio.ensure_future(self._connect()).add_done_callback(send)

    def close(self) -> None:
        """Close every connection."""
        for connection in self.opened:
            if connection.transport is not None:
                connection.transport.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        made = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        connection = made[1]
        self.opened.append(connection)
        return connection
