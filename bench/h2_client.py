"""A minimal HTTP/2 client for gRPC unary calls with prebuilt messages, for load generators
that share the machine with the server: it costs little more than the bytes it sends (grpcio's
asyncio client takes about a fifth of a core at 600 calls/s of 37 KB on the 2-core development
machine, `bench/RESULTS.md`).

One connection, spoken as an `asyncio.Protocol`: a call is one write (HEADERS and DATA frames
together, built with Volley's own `server.protocol.http2` helpers) and one callback with its
gRPC status when the answer's trailers arrive; no task or future per call. Answers are read
only for their status.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable

import hpack

from server.protocol import http2

CANCELLED = 1  # the status reported for a stream the server reset
UNAVAILABLE = 14  # the status reported for calls on a lost connection

Done = Callable[[int], None]


class UnaryClient(asyncio.Protocol):
    """Calls one gRPC method over one HTTP/2 connection.

    `start(message, done)` sends a call and later calls `done(status)` (0: OK); `call` is the
    same as a coroutine.
    """

    def __init__(self, address: str, path: str) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.header_block = http2.header_block(
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
             (b":authority", address.encode()), (b"content-type", b"application/grpc"),
             (b"te", b"trailers")]
        )  # fmt: skip
        self.next_stream = 1
        self.done: dict[int, Done] = {}
        self.stream_windows: dict[int, int] = {}
        self.blocked: deque[tuple[int, memoryview]] = deque()  # (stream, body left) in order
        self.send_window = http2.DEFAULT_WINDOW
        self.peer_initial_window = http2.DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.unacked = 0
        self.decoder = hpack.Decoder()
        self.statuses: dict[bytes, int] = {}  # header blocks that leave the HPACK table empty
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.settled: asyncio.Event | None = None

    async def connect(self) -> None:
        """Open the connection and wait for the server's SETTINGS."""
        self.settled = asyncio.Event()
        await asyncio.get_running_loop().create_connection(lambda: self, self.host, self.port)
        await self.settled.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HI", http2.SETTINGS_INITIAL_WINDOW_SIZE, http2.MAX_WINDOW)
        transport.write(  # type: ignore[attr-defined]
            http2.PREFACE
            + http2.frame(http2.SETTINGS, 0, 0, settings)
            + http2.frame(http2.WINDOW_UPDATE, 0, 0, (1 << 30).to_bytes(4, "big"))
        )

    def start(self, message: bytes, done: Done) -> None:
        """Send one request message; `done(status)` runs when its answer has come."""
        stream_id = self.next_stream
        self.next_stream += 2
        self.done[stream_id] = done
        self.stream_windows[stream_id] = self.peer_initial_window
        head = http2.frame(http2.HEADERS, http2.END_HEADERS, stream_id, self.header_block)
        body = memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)
        if self.blocked:  # earlier calls wait for window: this one's body goes after theirs
            self.transport.write(head)
            self.blocked.append((stream_id, body))
            return
        data, left = self._frames(stream_id, body)
        self.transport.write(head + data)
        if left:
            self.blocked.append((stream_id, left))

    async def call(self, message: bytes) -> int:
        """Send one request message; the call's gRPC status (0: OK)."""
        answer = asyncio.get_running_loop().create_future()
        self.start(message, lambda status: answer.done() or answer.set_result(status))
        return await answer

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.close()

    def _frames(self, stream_id: int, body: memoryview) -> tuple[bytes, memoryview]:
        """DATA frames for as much of `body` as the windows allow, and what is left of it."""
        out = []
        while body:
            room = min(self.send_window, self.stream_windows[stream_id], self.peer_max_frame)
            if room <= 0:
                break
            chunk, body = body[:room], body[room:]
            self.send_window -= len(chunk)
            self.stream_windows[stream_id] -= len(chunk)
            out.append(http2.frame(http2.DATA, 0 if body else http2.END_STREAM, stream_id, chunk))
        return b"".join(out), body

    def _unblock(self) -> None:
        """Send what waited for window, in order, as far as the windows now allow."""
        out = []
        while self.blocked:
            stream_id, body = self.blocked[0]
            if stream_id in self.stream_windows:  # not answered (or reset) meanwhile
                data, body = self._frames(stream_id, body)
                out.append(data)
                if body:
                    self.blocked[0] = (stream_id, body)
                    break
            self.blocked.popleft()
        if out:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        at = 0
        while len(buffer) - at >= 9:
            length = int.from_bytes(buffer[at : at + 3], "big")
            end = at + 9 + length
            if len(buffer) < end:
                break
            kind, flags = buffer[at + 3], buffer[at + 4]
            stream_id = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFFFFFF
            self._frame(kind, flags, stream_id, bytes(buffer[at + 9 : end]))
            at = end
        del buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        done, self.done = self.done, {}
        for callback in done.values():
            callback(UNAVAILABLE)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == http2.DATA:
            self.unacked += len(payload)
            if self.unacked >= 1 << 20:
                increment = self.unacked.to_bytes(4, "big")
                self.transport.write(http2.frame(http2.WINDOW_UPDATE, 0, 0, increment))
                self.unacked = 0
        elif kind == http2.HEADERS:
            if flags & http2.END_STREAM:
                self._answer(stream_id, self._status(payload))
        elif kind == http2.SETTINGS and not flags & http2.ACK:
            for at in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HI", payload, at)
                if key == http2.SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self.peer_initial_window
                    self.peer_initial_window = value
                    for open_stream in self.stream_windows:
                        self.stream_windows[open_stream] += delta
                elif key == http2.SETTINGS_MAX_FRAME_SIZE:
                    self.peer_max_frame = value
            self.transport.write(http2.frame(http2.SETTINGS, http2.ACK, 0))
            self._unblock()
            self.settled.set()
        elif kind == http2.WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += increment
            elif stream_id in self.stream_windows:
                self.stream_windows[stream_id] += increment
            self._unblock()
        elif kind == http2.PING and not flags & http2.ACK:
            self.transport.write(http2.frame(http2.PING, http2.ACK, 0, payload))
        elif kind == http2.RST_STREAM:
            self._answer(stream_id, CANCELLED)

    def _status(self, block: bytes) -> int:
        """grpc-status of a trailers block. A block decoded with an empty HPACK table that
        leaves it empty decodes the same every time, so its status is remembered."""
        status = self.statuses.get(block)
        if status is not None:
            return status
        stateless = not self.decoder.header_table.dynamic_entries
        status = int(dict(self.decoder.decode(block)).get("grpc-status", 2))
        if stateless and not self.decoder.header_table.dynamic_entries:
            self.statuses[block] = status
        return status

    def _answer(self, stream_id: int, status: int) -> None:
        self.stream_windows.pop(stream_id, None)
        done = self.done.pop(stream_id, None)
        if done is not None:
            done(status)
