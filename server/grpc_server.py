"""A gRPC server on asyncio: method dispatch, call contexts and status trailers over
`server.protocol.http2`, graceful shutdown with GOAWAY.

It serves the same service objects as grpcio's asyncio server (handlers take `(request,
context)`; streaming handlers take an async iterator of requests and yield answers; `context`
has `peer()`, `time_remaining()` and `abort()`), at a fraction of
grpcio's cost per call: `bench/RESULTS.md`, "gRPC on Volley's own HTTP/2 server".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import quote

import grpc

from server.held import HELD
from server.protocol import http2
from server.tracing import TRACER, Trace

log = logging.getLogger(__name__)

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 0, 1, 2, 4
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 8, 12, 13
# Requests a stream may hold unread before its client must wait for the window to reopen.
MAX_UNREAD_MESSAGES = 16
# Streams (calls) one connection may have open at once; more are refused (REFUSED_STREAM,
# which clients retry on another connection).
MAX_STREAMS_PER_CONNECTION = 1024
MAX_STATUS_MESSAGE = 4096
_RESPONSE_PAIRS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
RESPONSE_HEADERS = http2.header_block(_RESPONSE_PAIRS)
OK_TRAILERS = http2.header_block([(b"grpc-status", b"0")])
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)  # all but '%'


@dataclass(frozen=True)
class Method:
    """One RPC: its handler and how its messages turn into objects and back."""

    handler: Callable
    deserialize: Callable[[bytes], object]
    serialize: Callable[[object], bytes]
    streaming: bool = False


Authorizer = Callable[[str, dict[str, str]], tuple[grpc.StatusCode, str] | None]


class Abort(Exception):
    """Raised by `Context.abort`: the call ends with this status."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def trailers(code: int, details: str, *, with_headers: bool = False) -> bytes:
    """The header block ending a call with `code` (with the response headers too, for a call
    answered by trailers alone)."""
    pairs = list(_RESPONSE_PAIRS) if with_headers else []
    pairs.append((b"grpc-status", str(code).encode()))
    if details:
        text = quote(details[:MAX_STATUS_MESSAGE], safe=_MESSAGE_SAFE)
        pairs.append((b"grpc-message", text.encode("ascii")))
    return http2.header_block(pairs)


def end_call(stream: http2.Stream, code: int, details: str) -> None:
    """End `stream` with a status: in the trailers, or trailers alone if nothing was sent."""
    if stream.headers_sent:
        stream.respond(b"", None, trailers(code, details))
    else:
        stream.finish(trailers(code, details, with_headers=True))


class Context:
    """What a handler knows of its call (the subset of `grpc.aio.ServicerContext` Volley uses)."""

    __slots__ = ("_peer", "deadline", "_loop", "trace", "opened_ns", "read_ns")

    def __init__(
        self,
        peer: str,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._peer = peer
        self.deadline = deadline  # the loop's clock; None: the client set no deadline
        self._loop = loop
        self.trace: Trace | None = None  # set by a handler that traces the call
        # while tracing is on: when the call opened and its request was read (perf_counter ns)
        self.opened_ns = self.read_ns = 0

    def peer(self) -> str:
        """The client's address, as grpcio writes it ("ipv4:127.0.0.1:50000")."""
        return self._peer

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline; None without one."""
        if self.deadline is None:
            return None
        return max(self.deadline - self._loop.time(), 0.0)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        """End the call with `code` and `details`."""
        raise Abort(code.value[0], details)


class _Call:
    """What both kinds of call share: the stream they answer on and the method they serve."""

    __slots__ = ("server", "stream", "method", "context", "task")

    def __init__(
        self, server: GrpcServer, stream: http2.Stream, method: Method, context: Context
    ) -> None:
        self.server = server
        self.stream = stream
        self.method = method
        self.context = context
        self.task: asyncio.Task | None = None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def fail(self, code: int, message: str) -> None:
        self.cancel()
        end_call(self.stream, code, message)

    def _fits(self, body: bytes) -> bool:
        """Whether an answer is within the message limit; if not, the call ends with
        RESOURCE_EXHAUSTED."""
        if len(body) <= self.server.max_message:
            return True
        end_call(
            self.stream,
            RESOURCE_EXHAUSTED,
            f"answer larger than max ({len(body)} vs. {self.server.max_message})",
        )
        return False


class UnaryCall(_Call):
    """One request in, one answer out."""

    __slots__ = ("request", "timer")
    saturated = False

    def __init__(
        self, server: GrpcServer, stream: http2.Stream, method: Method, context: Context
    ) -> None:
        super().__init__(server, stream, method, context)
        self.request: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None

    def message(self, data: bytes) -> None:
        if self.request is not None:
            raise http2.StreamError(INTERNAL, "a unary call sent more than one request")
        self.request = data

    def half_close(self) -> None:
        if self.request is None:
            raise http2.StreamError(INTERNAL, "a unary call sent no request")
        if TRACER.on:
            self.context.read_ns = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._run())
        HELD.hold(self.task)
        if self.context.deadline is not None:
            self.timer = loop.call_at(self.context.deadline, self._expire)

    async def _run(self) -> None:
        stream = self.stream
        method = self.method
        try:
            response = await method.handler(method.deserialize(self.request), self.context)
            body = method.serialize(response)
        except Abort as abort:
            end_call(stream, abort.code, abort.details)
        except asyncio.CancelledError:
            if not stream.closed:  # the server is closing: the client hears it
                end_call(stream, CANCELLED, "the server cancelled the call")
            raise
        except Exception:
            log.exception("unexpected error in a gRPC handler", extra={"event": "grpc_error"})
            end_call(stream, UNKNOWN, "unexpected server error")
        else:
            if self._fits(body):
                trace = self.context.trace
                if trace is None:
                    stream.respond(RESPONSE_HEADERS, body, OK_TRAILERS)
                else:
                    trace.stamp("GRPC_SEND_START")
                    stream.respond(RESPONSE_HEADERS, body, OK_TRAILERS)
                    trace.stamp("GRPC_SEND_END")
        finally:
            if self.timer is not None:
                self.timer.cancel()
            if self.context.trace is not None:
                self.context.trace.finish()

    def _expire(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            end_call(self.stream, DEADLINE_EXCEEDED, "Deadline Exceeded")


class StreamCall(_Call):
    """Requests in and answers out as they come (`ModelStreamInfer`)."""

    __slots__ = ("unread", "ended", "waiter")

    def __init__(
        self, server: GrpcServer, stream: http2.Stream, method: Method, context: Context
    ) -> None:
        super().__init__(server, stream, method, context)
        self.unread: deque[bytes] = deque()
        self.ended = False
        self.waiter: asyncio.Future | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    @property
    def saturated(self) -> bool:
        return len(self.unread) >= MAX_UNREAD_MESSAGES

    def message(self, data: bytes) -> None:
        self.unread.append(data)
        self._wake()

    def half_close(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _requests(self) -> AsyncIterator[object]:
        deserialize = self.method.deserialize
        while True:
            while not self.unread:
                if self.ended:
                    return
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
            data = self.unread.popleft()
            self.stream.release_if_due()
            yield deserialize(data)

    async def _run(self) -> None:
        stream = self.stream
        serialize = self.method.serialize
        try:
            answers = self.method.handler(self._requests(), self.context)
            async with contextlib.aclosing(answers):
                async for answer in answers:
                    body = serialize(answer)
                    if not self._fits(body):
                        return
                    stream.respond(RESPONSE_HEADERS, body, None)
                    if stream.outbox or stream.connection.paused:
                        await stream.drained()
            end_call(stream, OK, "")
        except Abort as abort:
            end_call(stream, abort.code, abort.details)
        except asyncio.CancelledError:
            if not stream.closed:
                end_call(stream, CANCELLED, "the server cancelled the call")
            raise
        except Exception:
            log.exception("unexpected error in a gRPC handler", extra={"event": "grpc_error"})
            end_call(stream, UNKNOWN, "unexpected server error")


class GrpcServer:
    """Serves `methods` (by path, "/package.Service/Method") on one port."""

    def __init__(
        self,
        methods: dict[str, Method],
        max_message: int,
        authorize: Authorizer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.methods = methods
        self.max_message = max_message
        self.authorize = authorize
        self.ssl_context = ssl_context
        self.connections: set[http2.Connection] = set()
        self._listener: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on `host:port` (a worker of several is passed its connections instead:
        `new_connection` is their protocol factory)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self.new_connection, host, port, ssl=self.ssl_context, backlog=4096,
            reuse_address=True,
        )  # fmt: skip

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every client (GOAWAY) which calls were taken, let those finish
        for up to `grace` seconds, then close."""
        if self._listener is not None:
            self._listener.close()
        for connection in list(self.connections):
            connection.go_away()
        lost = [c.lost for c in self.connections if c.lost is not None]
        if lost:
            await asyncio.wait(lost, timeout=max(grace, 0.0))
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    def new_connection(self) -> http2.Connection:
        """The protocol of a new connection."""
        connection = http2.Connection(
            self._open_call, self.max_message, MAX_STREAMS_PER_CONNECTION, self.connections.discard
        )
        self.connections.add(connection)
        return connection

    def _open_call(self, stream: http2.Stream) -> UnaryCall | StreamCall | None:
        headers = stream.headers
        path = headers.get(":path", "")
        method = self.methods.get(path)
        refusal = None
        if not headers.get("content-type", "").startswith("application/grpc"):
            refusal = (INTERNAL, "content-type must be application/grpc")
        elif method is None:
            refusal = (UNIMPLEMENTED, f"Method not found: {path}")
        elif headers.get("grpc-encoding", "identity") not in ("identity", "gzip", "deflate"):
            refusal = (UNIMPLEMENTED, f"unsupported grpc-encoding {headers['grpc-encoding']}")
        elif self.authorize is not None:
            denied = self.authorize(path, headers)
            if denied is not None:
                refusal = (denied[0].value[0], denied[1])
        if refusal is not None:
            end_call(stream, *refusal)
            return None
        loop = asyncio.get_running_loop()
        deadline = None
        timeout = headers.get("grpc-timeout")
        if timeout is not None:
            seconds = _timeout_seconds(timeout)
            if seconds is not None:
                deadline = loop.time() + seconds
        context = Context(stream.connection.peer, deadline, loop)
        if TRACER.on:
            context.opened_ns = time.perf_counter_ns()
        if method.streaming:
            return StreamCall(self, stream, method, context)
        return UnaryCall(self, stream, method, context)


def _timeout_seconds(value: str) -> float | None:
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit
