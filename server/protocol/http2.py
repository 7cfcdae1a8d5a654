"""HTTP/2 for the gRPC front end: frames, HPACK, flow control; one asyncio protocol a connection.

Only what a gRPC server needs (RFC 9113): client-initiated streams, no server push, no
priorities. Each new stream is handed to `open_call` with its decoded headers, which returns the
`Call` that receives the stream's gRPC messages; the call answers through its `Stream`.

Built for the hot path: frames are parsed straight from the receive buffer, the answers of one
event-loop iteration leave in one `write`, header blocks the server sends are constant bytes
(literals, no dynamic table), and a request header block that refers only to the HPACK table
is decoded once and remembered until the table changes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from collections import deque
from collections.abc import Callable
from typing import Protocol

import hpack
from hpack.table import HeaderTable

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x6, 0x7, 0x9
ENHANCE_YOUR_CALM = 0xB
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
# gRPC statuses for messages that break the framing rules
GRPC_RESOURCE_EXHAUSTED, GRPC_INTERNAL = 8, 13

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
# What a client may send: frames up to 1 MiB (fewer frames per camera image), 1 MiB unread per
# stream, header lists up to 16 KiB; the connection window is topped up a quarter at a time.
MAX_FRAME = 1 << 20
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_HEADER_LIST = 16 << 10
HEADER_CACHE_SIZE = 256
# A connection that has not sent the HTTP/2 preface by then is closed (it holds a socket).
PREFACE_TIMEOUT_S = 10.0


def _our_settings(max_streams: int) -> bytes:
    return b"".join(
        struct.pack(">HI", key, value)
        for key, value in (
            (SETTINGS_MAX_CONCURRENT_STREAMS, max_streams),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
        )
    )


# A frame's 9-byte header: the 24-bit length as its top 16 bits and its low 8, then the type,
# the flags and the stream id (whose reserved top bit is masked off on reading).
FRAME_HEADER = struct.Struct(">HBBBI")


def frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    """One frame: the 9-byte header, then the payload."""
    size = len(payload)
    return FRAME_HEADER.pack(size >> 8, size & 255, kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """HPACK for headers the server sends: literals without indexing (no table state, so a
    block can be built once and sent on any connection); `:status: 200` as its static index."""
    out = bytearray()
    for name, value in headers:
        if name == b":status" and value == b"200":
            out.append(0x88)
            continue
        out += b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value
    return bytes(out)


class Call(Protocol):
    """What a stream's gRPC call receives from the connection."""

    def message(self, data: bytes) -> None:
        """A whole gRPC message arrived (decompressed)."""

    def half_close(self) -> None:
        """The client sent its last message."""

    def cancel(self) -> None:
        """The stream was reset or the connection lost: stop, answer nothing."""

    def fail(self, code: int, message: str) -> None:
        """The client's messages broke a rule (`StreamError`): stop, and answer this status."""

    @property
    def saturated(self) -> bool:
        """True while the call holds as many unread messages as it takes: the client's window
        is not reopened until it reads some (`Stream.release_if_due`)."""


class StreamError(Exception):
    """A problem with one stream's messages: the call ends with this gRPC status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Stream:
    """One HTTP/2 stream: reassembles the client's gRPC messages, sends the server's."""

    __slots__ = (
        "id", "connection", "headers", "call", "buffer", "send_window", "outbox", "trailers",
        "headers_sent", "closed", "writable", "decompress", "unacked", "client_ended",
    )  # fmt: skip

    def __init__(self, stream_id: int, connection: Connection, headers: dict[str, str]) -> None:
        self.id = stream_id
        self.connection = connection
        self.headers = headers
        self.call: Call | None = None
        self.buffer = bytearray()
        self.send_window = connection.peer_initial_window
        self.outbox: deque[bytes | memoryview] = deque()
        self.trailers: bytes | None = None
        self.headers_sent = False
        self.closed = False
        self.writable: asyncio.Event | None = None
        self.decompress = _decompressor(headers.get("grpc-encoding", "identity"))
        self.unacked = 0  # bytes taken by the call that the client's window does not have back
        self.client_ended = False  # the client's END_STREAM arrived: its side is closed

    # -- from the client --

    def receive(self, data: bytes | memoryview, end: bool, flow: int = 0) -> None:
        """DATA for this stream (`flow`: the frame's length, padding included, that the
        client's window for this stream lost): complete messages go to the call."""
        buffer = self.buffer
        if buffer:
            buffer += data
        else:
            buffer = data
        offset = 0
        size = len(buffer)
        max_message = self.connection.max_message
        while size - offset >= 5:
            length = int.from_bytes(buffer[offset + 1 : offset + 5], "big")
            if length > max_message:
                raise StreamError(
                    GRPC_RESOURCE_EXHAUSTED,
                    f"received message larger than max ({length} vs. {max_message})",
                )
            end_of_message = offset + 5 + length
            if end_of_message > size:
                break
            with memoryview(buffer) as view:  # one copy: the message's own bytes
                message = bytes(view[offset + 5 : end_of_message])
            if buffer[offset]:
                message = self._decompressed(message)
            offset = end_of_message
            self.call.message(message)
        rest = buffer[offset:] if offset else buffer
        self.buffer = rest if isinstance(rest, bytearray) else bytearray(rest)
        if end:
            self.client_ended = True
            if self.buffer:
                raise StreamError(GRPC_INTERNAL, "the request ended inside a message")
            self.call.half_close()
            return
        self.unacked += flow
        self.release_if_due()

    def _decompressed(self, message: bytes) -> bytes:
        if self.decompress is None:
            raise StreamError(GRPC_INTERNAL, "compressed message without a grpc-encoding")
        max_message = self.connection.max_message
        inflater = self.decompress()
        try:
            out = inflater.decompress(message, max_message + 1)
        except zlib.error as exc:
            raise StreamError(GRPC_INTERNAL, f"message does not decompress: {exc}") from None
        if len(out) > max_message or inflater.unconsumed_tail:
            raise StreamError(
                GRPC_RESOURCE_EXHAUSTED,
                f"received message larger than max after decompression (> {max_message})",
            )
        return out

    def release_if_due(self) -> None:
        """Give the client back the window of what it sent, once that is a quarter of the
        window and the call has room for more messages."""
        if self.unacked >= STREAM_WINDOW // 4 and not self.closed and not self.call.saturated:
            self.connection.send(frame(WINDOW_UPDATE, 0, self.id, self.unacked.to_bytes(4, "big")))
            self.unacked = 0

    # -- to the client --

    def respond(self, headers: bytes, message: bytes | None, trailers: bytes | None) -> None:
        """Send the response headers (once), a message, and the trailers that end the stream;
        what flow control holds back goes out as the client's window opens."""
        if self.closed:
            return
        connection = self.connection
        if message is not None and trailers is not None and not self.headers_sent:
            size = len(message) + 5
            if size <= min(self.send_window, connection.send_window, connection.peer_max_frame):
                self._respond_at_once(headers, message, trailers)
                return
        if not self.headers_sent:
            self.headers_sent = True
            connection.send(frame(HEADERS, END_HEADERS, self.id, headers))
        if message is not None:
            self.outbox.append(b"\x00" + len(message).to_bytes(4, "big") + message)
        if trailers is not None:
            self.trailers = trailers
        self.flush()

    def _respond_at_once(self, headers: bytes, message: bytes, trailers: bytes) -> None:
        """A whole answer that the windows let through (most unary answers): its headers, its
        message in one DATA frame and its trailers, in one buffer."""
        size = len(message) + 5
        self.send_window -= size
        self.connection.send_window -= size
        self.headers_sent = self.closed = True
        self.connection.send(
            b"".join((
                frame(HEADERS, END_HEADERS, self.id, headers),
                FRAME_HEADER.pack(size >> 8, size & 255, DATA, 0, self.id),
                b"\x00", len(message).to_bytes(4, "big"), message,
                frame(HEADERS, END_HEADERS | END_STREAM, self.id, trailers),
            ))
        )  # fmt: skip
        if self.writable is not None:
            self.writable.set()
        self.connection.end_stream(self)

    def finish(self, trailers: bytes) -> None:
        """End the stream with one header block (a call answered by its status alone)."""
        if self.closed:
            return
        self.headers_sent = True
        self.closed = True
        self.connection.send(frame(HEADERS, END_HEADERS | END_STREAM, self.id, trailers))
        self.connection.end_stream(self)

    def flush(self) -> None:
        """Send what the windows allow; then the trailers, once everything before them left."""
        connection = self.connection
        outbox = self.outbox
        while outbox:
            room = min(self.send_window, connection.send_window)
            if room <= 0:
                connection.blocked.add(self)
                return
            chunk = outbox[0]
            size = min(len(chunk), room, connection.peer_max_frame)
            if size == len(chunk):
                outbox.popleft()
            else:  # views, so that a large answer is not copied once per frame
                view = memoryview(chunk)
                outbox[0] = view[size:]
                chunk = view[:size]
            self.send_window -= size
            connection.send_window -= size
            connection.send(frame(DATA, 0, self.id, chunk))
        if self.writable is not None:
            self.writable.set()
        if self.trailers is not None and not self.closed:
            self.closed = True
            connection.send(frame(HEADERS, END_HEADERS | END_STREAM, self.id, self.trailers))
            connection.end_stream(self)

    async def drained(self) -> None:
        """Wait until what was sent on this stream left (flow control and the socket)."""
        while self.outbox and not self.closed:
            if self.writable is None:
                self.writable = asyncio.Event()
            self.writable.clear()
            await self.writable.wait()
        await self.connection.writable()


def _decompressor(encoding: str) -> Callable[[], object] | None:
    if encoding == "gzip":
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return lambda: zlib.decompressobj()
    return None


class _CountingTable(HeaderTable):
    """An HPACK dynamic table that counts its additions: a header block decodes to the same
    headers as long as the table neither gained entries nor changed size."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0

    def add(self, name: bytes, value: bytes) -> object:
        self.changes += 1
        return super().add(name, value)


class Connection(asyncio.Protocol):
    """One client connection: parses frames, keeps the streams, writes what they send."""

    def __init__(
        self,
        open_call: Callable[[Stream], Call | None],
        max_message: int,
        max_streams: int,
        on_close: Callable[[Connection], None],
    ) -> None:
        self.open_call = open_call
        self.max_message = max_message
        self.max_streams = max_streams
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, Stream] = {}
        self.blocked: set[Stream] = set()
        self.buffer = bytearray()  # the start of a frame that has not fully arrived
        self._needed = len(PREFACE)  # bytes the buffer must hold before parsing is worth it
        self.started = False
        self.last_stream = 0
        self.goaway_sent: int | None = None
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.send_window = DEFAULT_WINDOW
        self._window_owed = 0  # connection window taken by DATA and not given back yet
        self.decoder = hpack.Decoder()
        self.decoder.header_table = self._table = _CountingTable()
        self.decoder.max_header_list_size = MAX_HEADER_LIST
        self.decoder.max_allowed_table_size = 4096
        self._header_cache: dict[bytes, dict[str, str]] = {}
        self._continuing: tuple[int, int, bytearray] | None = None
        self._out: list[bytes] = []
        self._write_scheduled = False
        self._paused: asyncio.Future | None = None
        self.lost: asyncio.Future | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        self._preface_timer = loop.call_later(PREFACE_TIMEOUT_S, self._no_preface)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host, port = peer[0], peer[1]
            self.peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        window = (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")
        self.send(
            frame(SETTINGS, 0, 0, _our_settings(self.max_streams))
            + frame(WINDOW_UPDATE, 0, 0, window)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._preface_timer.cancel()
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.blocked.clear()
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        self.on_close(self)

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    @property
    def paused(self) -> bool:
        """True while the socket's send buffer is full."""
        return self._paused is not None

    async def writable(self) -> None:
        """Wait while the socket's send buffer is full."""
        if self._paused is not None:
            await asyncio.shield(self._paused)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        buffer = self.buffer
        if buffer:  # appended, not joined: a large frame in many reads costs linear time
            buffer += data
            if len(buffer) < self._needed:
                return
            data = bytes(buffer)
            buffer.clear()
        try:
            offset = self._frames(data)
        except _ConnectionError as exc:
            self.close(exc.code, str(exc))
            return
        if offset < len(data):
            buffer += memoryview(data)[offset:]
            if not self.started:
                self._needed = len(PREFACE)
            elif len(buffer) >= 9:
                self._needed = 9 + int.from_bytes(buffer[:3], "big")
            else:
                self._needed = 9

    def eof_received(self) -> bool:
        return False

    def _no_preface(self) -> None:
        if not self.started and self.transport is not None:
            self.transport.close()

    # -- parsing --

    def _frames(self, buffer: bytes) -> int:
        offset = 0
        if not self.started:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return 0
            if not buffer.startswith(PREFACE):
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self.started = True
            self._preface_timer.cancel()
            offset = len(PREFACE)
        size = len(buffer)
        received = 0
        view = memoryview(buffer)  # frame payloads are views: no copy until a message is whole
        while size - offset >= 9:
            high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buffer, offset)
            length = high << 8 | low
            if length > MAX_FRAME:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = offset + 9 + length
            if end > size:
                break
            stream_id &= 0x7FFFFFFF
            payload = view[offset + 9 : end]
            offset = end
            if self._continuing is not None and kind != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "expected a CONTINUATION frame")
            if kind == DATA:
                received += length
                self._data(stream_id, flags, payload)
            elif kind == HEADERS:
                self._headers(stream_id, flags, payload)
            elif kind == CONTINUATION:
                self._continuation(stream_id, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream_id, payload)
            elif kind == SETTINGS:
                self._settings(stream_id, flags, payload)
            elif kind == PING:
                if len(payload) != 8 or stream_id:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "bad PING")
                if not flags & ACK:
                    self.send(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    self._cancel(stream)
            elif kind == GOAWAY:  # the client leaves: end once its streams are answered
                if self.goaway_sent is None:
                    self.goaway_sent = self.last_stream
                if not self.streams:
                    self._close_when_sent()
            elif kind == PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "a client cannot push")
            # PRIORITY and unknown frame types are ignored (RFC 9113 5.5)
        # The connection window goes back a quarter at a time, not after every read: a write
        # (and a wake-up of the client) less per request. Stream windows bound the memory.
        self._window_owed += received
        if self._window_owed >= CONNECTION_WINDOW // 4:
            self.send(frame(WINDOW_UPDATE, 0, 0, self._window_owed.to_bytes(4, "big")))
            self._window_owed = 0
        return offset

    def _data(self, stream_id: int, flags: int, payload: memoryview) -> None:
        flow = len(payload)
        if flags & PADDED:
            payload = _unpadded(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id == 0 or stream_id > self.last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream that ended or was reset: ignored
        try:
            stream.receive(payload, bool(flags & END_STREAM), flow)
        except StreamError as exc:
            self.fail_stream(stream, exc.code, exc.message)

    def _headers(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if flags & PADDED:
            payload = _unpadded(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, bytes(payload))
        else:
            self._continuing = (stream_id, flags, bytearray(payload))

    def _continuation(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if self._continuing is None or self._continuing[0] != stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION frame")
        block = self._continuing[2]
        block += payload
        if len(block) > 4 * MAX_HEADER_LIST:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            first_flags = self._continuing[1]
            self._continuing = None
            self._header_block(stream_id, first_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: they end its side
            try:
                stream.receive(b"", True)
            except StreamError as exc:
                self.fail_stream(stream, exc.code, exc.message)
            return
        if stream_id % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if stream_id <= self.last_stream:  # a stream the server already ended: nothing to do
            return
        self.last_stream = stream_id
        if self.goaway_sent is not None or len(self.streams) >= self.max_streams:
            self._reset(stream_id, REFUSED_STREAM)
            return
        stream = Stream(stream_id, self, headers)
        stream.client_ended = bool(flags & END_STREAM)
        self.streams[stream_id] = stream
        stream.call = self.open_call(stream)
        if stream.call is None:  # answered already (trailers only)
            return
        if flags & END_STREAM:
            try:
                stream.receive(b"", True)
            except StreamError as exc:
                self.fail_stream(stream, exc.code, exc.message)

    def _decode(self, block: bytes) -> dict[str, str]:
        cached = self._header_cache.get(block)
        if cached is not None:
            return cached
        table = self._table
        changes, size = table.changes, table.maxsize
        try:
            decoded = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        headers: dict[str, str] = {}
        for name, value in decoded:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        if changes == table.changes and size == table.maxsize:
            if len(self._header_cache) >= HEADER_CACHE_SIZE:
                self._header_cache.clear()
            self._header_cache[block] = headers
        else:  # indices moved: what was remembered may now mean something else
            self._header_cache.clear()
        return headers

    def _window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            blocked, self.blocked = self.blocked, set()
            for stream in blocked:
                stream.flush()
            return
        stream = self.streams.get(stream_id)
        if stream is not None and increment:
            stream.send_window += increment
            self.blocked.discard(stream)
            stream.flush()

    def _settings(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad SETTINGS")
        for at in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, at)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self.send(frame(SETTINGS, ACK, 0))
        for stream in list(self.streams.values()):
            if stream.outbox:
                stream.flush()

    # -- streams and writing --

    def fail_stream(self, stream: Stream, code: int, message: str) -> None:
        """End `stream` with a gRPC error and reset it, so the client stops sending."""
        if stream.call is not None:
            stream.call.fail(code, message)  # its trailers end the stream, and reset it
        if stream.id in self.streams:  # the trailers wait on flow control: reset it now
            self._cancel(stream)
            self._reset(stream.id, NO_ERROR)

    def end_stream(self, stream: Stream) -> None:
        """The server's side of `stream` is complete: forget it (and let go of its call, which
        refers back to it: reference counting, not the cycle collector, frees both).

        A client still sending on it is told to stop with RST_STREAM(NO_ERROR) (RFC 9113,
        8.1): only then does a gRPC client count its call complete, which it must before the
        connection closes (a camera stream ended by a shutdown), or the answered call fails
        with "Stream removed"."""
        if not stream.client_ended:
            stream.client_ended = True
            self._reset(stream.id, NO_ERROR)
        self.streams.pop(stream.id, None)
        self.blocked.discard(stream)
        stream.call = None
        if self.goaway_sent is not None and not self.streams:
            self._close_when_sent()

    def _reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM with `code` (an HTTP/2 error code)."""
        self.send(frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))

    def _cancel(self, stream: Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.blocked.discard(stream)
        if stream.call is not None:
            stream.call.cancel()
            stream.call = None
        if stream.writable is not None:
            stream.writable.set()

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in this loop iteration leaves in one write."""
        self._out.append(data)
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_out)

    def _write_out(self) -> None:
        self._write_scheduled = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def go_away(self) -> None:
        """Take no new streams (GOAWAY naming the last one taken); close once the rest end."""
        if self.goaway_sent is None:
            self.goaway_sent = self.last_stream
            self.send(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, NO_ERROR)))
        if not self.streams:
            self._close_when_sent()

    def close(self, code: int, message: str) -> None:
        """Close with GOAWAY(code): a connection error, or the server's last word."""
        if code != NO_ERROR:
            log.info(
                "closing an HTTP/2 connection",
                extra={"event": "http2_error", "peer": self.peer, "reason": message},
            )
        last = self.last_stream if self.goaway_sent is None else self.goaway_sent
        self.goaway_sent = last
        self.send(frame(GOAWAY, 0, 0, struct.pack(">II", last, code) + message.encode()[:256]))
        self._close_when_sent()

    def _close_when_sent(self) -> None:
        if self._write_scheduled:
            self._write_out()
        if self.transport is not None:
            self.transport.close()


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _unpadded(payload: memoryview) -> memoryview:
    if not payload:
        raise _ConnectionError(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]
