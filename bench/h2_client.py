"""A minimal HTTP/2 client for gRPC unary calls with prebuilt messages, for load generators
that share the machine with the server: it costs little more than the bytes it sends (grpcio's
asyncio client takes about a fifth of a core at 600 calls/s of 37 KB on the 2-core development
machine, `bench/RESULTS.md`). One connection; frames are built with Volley's own
`server.protocol.http2` helpers; answers are read only for their status.
"""

from __future__ import annotations

import asyncio
import struct

import hpack

from server.protocol import http2

CANCELLED = 1  # the status reported for a stream the server reset


class UnaryClient:
    """Calls one gRPC method over one HTTP/2 connection; `call` returns the gRPC status."""

    def __init__(self, address: str, path: str) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.header_block = http2.header_block(
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
             (b":authority", address.encode()), (b"content-type", b"application/grpc"),
             (b"te", b"trailers")]
        )  # fmt: skip
        self.next_stream = 1
        self.pending: dict[int, asyncio.Future] = {}
        self.stream_windows: dict[int, int] = {}
        self.send_window = http2.DEFAULT_WINDOW
        self.peer_initial_window = http2.DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.unacked = 0
        self.decoder = hpack.Decoder()
        self.window_open = asyncio.Event()
        self.settled = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.reading: asyncio.Task | None = None

    async def connect(self) -> None:
        """Open the connection and wait for the server's SETTINGS."""
        reader, self.writer = await asyncio.open_connection(self.host, self.port)
        settings = struct.pack(">HI", http2.SETTINGS_INITIAL_WINDOW_SIZE, http2.MAX_WINDOW)
        self.writer.write(
            http2.PREFACE
            + http2.frame(http2.SETTINGS, 0, 0, settings)
            + http2.frame(http2.WINDOW_UPDATE, 0, 0, (1 << 30).to_bytes(4, "big"))
        )
        self.reading = asyncio.create_task(self._read(reader))
        await self.settled.wait()

    async def call(self, message: bytes) -> int:
        """Send one request message; the call's gRPC status (0: OK)."""
        stream_id = self.next_stream
        self.next_stream += 2
        answer = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = answer
        self.stream_windows[stream_id] = self.peer_initial_window
        self.writer.write(
            http2.frame(http2.HEADERS, http2.END_HEADERS, stream_id, self.header_block)
        )
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        offset = 0
        while offset < len(body):
            room = min(self.send_window, self.stream_windows[stream_id], self.peer_max_frame)
            if room <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            chunk = body[offset : offset + room]
            offset += len(chunk)
            self.send_window -= len(chunk)
            self.stream_windows[stream_id] -= len(chunk)
            flags = http2.END_STREAM if offset == len(body) else 0
            self.writer.write(http2.frame(http2.DATA, flags, stream_id, chunk))
        try:
            return await answer
        finally:
            self.stream_windows.pop(stream_id, None)

    async def close(self) -> None:
        """Close the connection."""
        if self.reading is not None:
            self.reading.cancel()
        if self.writer is not None:
            self.writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream_id = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length) if length else b""
                self._frame(kind, flags, stream_id, payload)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for answer in self.pending.values():
                if not answer.done():
                    answer.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == http2.DATA:
            self.unacked += len(payload)
            if self.unacked >= 1 << 20:
                increment = self.unacked.to_bytes(4, "big")
                self.writer.write(http2.frame(http2.WINDOW_UPDATE, 0, 0, increment))
                self.unacked = 0
        elif kind == http2.HEADERS:
            headers = dict(self.decoder.decode(payload))
            if flags & http2.END_STREAM:
                self._answer(stream_id, int(headers.get("grpc-status", 2)))
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
            self.writer.write(http2.frame(http2.SETTINGS, http2.ACK, 0))
            self.window_open.set()
            self.settled.set()
        elif kind == http2.WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += increment
            elif stream_id in self.stream_windows:
                self.stream_windows[stream_id] += increment
            self.window_open.set()
        elif kind == http2.PING and not flags & http2.ACK:
            self.writer.write(http2.frame(http2.PING, http2.ACK, 0, payload))
        elif kind == http2.RST_STREAM:
            self._answer(stream_id, CANCELLED)

    def _answer(self, stream_id: int, status: int) -> None:
        answer = self.pending.pop(stream_id, None)
        if answer is not None and not answer.done():
            answer.set_result(status)
