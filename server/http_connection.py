"""HTTP/1.1 connections: uvicorn's httptools protocol, with infer requests answered directly.

uvicorn turns every request into ASGI: a scope, receive and send message dicts, a task running
the application through its exception wrapper, two writes per response. For `POST .../infer`,
the hot path, that machinery took about as much of the event loop as Volley's own work (a fixed
answer cost 31 us of loop time through ASGI, 15 us through this module; bench/RESULTS.md). So
this protocol keeps uvicorn's parser, keep-alive, pipelining, flow control, timeouts and
graceful shutdown, and serves infer requests with an `InferExchange`: the body as it arrives,
`HttpFrontEnd.answer_infer`, the answer in one write. Every other request (the control routes,
WebSocket upgrades) goes to the ASGI application as before.

It leans on uvicorn's protocol internals, hence the pinned uvicorn version in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Sequence

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.held import HELD
from server.http_api import INFER_ROUTE, Answer, HttpFrontEnd
from server.tracing import TRACER

Header = tuple[bytes, bytes]

log = logging.getLogger(__name__)
SMALL_BODY = 65536  # answers up to this size go out with their head in one buffer
DISCARD_BYTES = 1 << 20  # the unread body of a request refused early, dropped as it arrives
ROUTES_KEPT = 1024  # request targets whose infer route is remembered (`infer_route`)
_routes: dict[bytes, re.Match | None] = {}


def protocol_for(front_end: HttpFrontEnd) -> type[HttpToolsProtocol]:
    """The uvicorn `http` protocol class of a listener serving `front_end`."""
    return type("VolleyHttpProtocol", (VolleyHttpProtocol,), {"front_end": front_end})


class VolleyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, handing infer requests to `InferExchange`."""

    front_end: HttpFrontEnd

    idle_since: float | None = None  # when its last answer went out; None while a request is in

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._disarm_keep_alive()
        for cycle, _ in self.pipeline:  # pipelined requests that will never be answered
            if type(cycle) is InferExchange:
                cycle.release()
        # The last exchange refers back to this protocol: let reference counting free both.
        self.cycle = None
        self.pipeline.clear()

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn cancels its keep-alive timer when data arrives and starts a new one after
        # each answer: a timer handle made and cancelled per request. Here one timer stays
        # armed; when it fires it closes the connection only if it has been idle for the
        # whole timeout, and otherwise waits for the rest of it (or for the next answer).
        self.idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self._arm_keep_alive(self.timeout_keep_alive)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:  # a request is in: the timer is armed again after it
            return
        left = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._arm_keep_alive(left)
        else:
            super().timeout_keep_alive_handler()

    def _arm_keep_alive(self, seconds: float) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(
            seconds, self.timeout_keep_alive_handler
        )

    def _disarm_keep_alive(self) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        self._disarm_keep_alive()
        # The WebSocket protocol owns the connection from here, so `connection_lost` is never
        # called on this one: break its parser's callbacks into it here instead.
        self.parser = None
        self.cycle = None

    def on_message_begin(self) -> None:
        # uvicorn builds the request's ASGI scope here: only those that need one get it, below
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.get_method() == b"POST" and not parser.should_upgrade():
            route = infer_route(self.url)
            if route:
                headers = dict(self.headers)
                if not self._refused_early(route, headers):
                    self._start_exchange(route, headers)
                return
        url, headers, expect_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # the scope, around what the parser has read so far
        self.url, self.expect_100_continue = url, expect_continue
        self.headers = self.scope["headers"] = headers
        super().on_headers_complete()

    def _refused_early(self, route: re.Match, headers: dict[bytes, bytes]) -> bool:
        """Answer at once, from its headers, an infer request its model refuses now (see
        `HttpFrontEnd.early_refusal`); the body that follows is read and dropped. The connection
        closes after the answer instead where the body is larger than DISCARD_BYTES, of unknown
        length, or held back by `Expect: 100-continue`, or the server is draining."""
        previous = self.cycle
        if previous is not None and not previous.response_complete:
            return False  # pipelined behind an unanswered request: answered in turn
        answer = self.front_end.early_refusal(route, headers)
        if answer is None:
            return False
        length = headers.get(b"content-length", b"")
        keep_alive = (
            self.parser.get_http_version() != "1.0"
            and self.parser.should_keep_alive()
            and not self.expect_100_continue
            and length.isdigit()
            and int(length) <= DISCARD_BYTES
            and not self.front_end.dataplane.draining
        )
        self.cycle = RefusedExchange()
        cors = _cors(self.front_end, headers)
        self.transport.write(
            _head(answer, keep_alive, self.server_state.default_headers, cors) + answer.body
        )
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
        return True

    def _start_exchange(self, route: re.Match, headers: dict[bytes, bytes]) -> None:
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        previous = self.cycle
        self.cycle = InferExchange(self, route, headers, keep_alive)
        if previous is None or previous.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # pipelined behind an unanswered request: started when that one is answered
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is InferExchange:
            cycle.add_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is InferExchange:
            cycle.end_body()
        else:
            super().on_message_complete()


def infer_route(url: bytes) -> re.Match | None:
    """The INFER_ROUTE match of a request target (None: not an infer request), remembered for
    the first ROUTES_KEPT targets seen (clients send the same few over and over)."""
    try:
        return _routes[url]
    except KeyError:
        pass
    path = httptools.parse_url(url).path.decode("ascii")
    if "%" in path:
        path = urllib.parse.unquote(path)
    route = INFER_ROUTE.match(path)
    if len(_routes) < ROUTES_KEPT:
        _routes[url] = route
    return route


class InferExchange:
    """One infer request and its answer, in the place of uvicorn's `RequestResponseCycle`.

    The protocol reads `response_complete`, sets `keep_alive` (False on shutdown) and
    `disconnected`, calls `message_event.set()` when the connection is lost, and starts the
    exchange (at once, or when the request pipelined before it is answered) with `run_asgi`.
    """

    def __init__(
        self,
        protocol: VolleyHttpProtocol,
        route: re.Match,
        headers: dict[bytes, bytes],
        keep_alive: bool,
    ) -> None:
        self.protocol = protocol
        self.route = route
        self.target = protocol.url  # path and query, as the client sent them
        self.headers = headers
        self.cors = _cors(protocol.front_end, headers)
        self.keep_alive = keep_alive
        self.expect_continue = protocol.expect_100_continue
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.message_event = _Wakeup()  # the protocol wakes a waiting `receive` through it
        self.held = True  # counted in HELD until answered (or dropped unanswered)
        HELD.add()
        self.trace = TRACER.sample(route[1]) if TRACER.on else None
        if self.trace is not None:
            self.trace.stamp("HTTP_RECV_START")

    def release(self) -> None:
        """No longer held: answered, or never to be (its connection is gone)."""
        if self.held:
            self.held = False
            HELD.release()

    def add_body(self, chunk: bytes) -> None:
        if self.response_complete:  # answered early (refused): the rest is not read
            return
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        if self.buffered > HIGH_WATER_LIMIT:  # read on once the front end has taken it
            self.protocol.flow.pause_reading()
        self.message_event.set()

    def end_body(self) -> None:
        self.more_body = False
        self.message_event.set()
        if self.trace is not None:
            self.trace.stamp("HTTP_RECV_END")

    def take_whole_body(self) -> bytes | None:
        """The body, taken, if all of it has been read (as it mostly has by the time the exchange
        runs: it came with the headers) and no `100 Continue` is due; else None, and `receive`
        gives it as it comes."""
        if self.more_body or self.expect_continue or self.disconnected:
            return None
        return self._take_chunks()

    def _take_chunks(self) -> bytes:
        """The body read so far, taken; reading resumes if `add_body` paused it."""
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        if self.protocol.flow.read_paused:  # by `add_body`, past HIGH_WATER_LIMIT
            self.protocol.flow.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def receive(self) -> dict:
        """The body so far as an ASGI `http.request` message (or `http.disconnect`)."""
        protocol = self.protocol
        if self.expect_continue and not protocol.transport.is_closing():
            protocol.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_continue = False
        while not self.chunks and self.more_body and not self.disconnected:
            protocol.flow.resume_reading()
            await self.message_event.wait(protocol.loop)
        if self.disconnected:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": self._take_chunks(), "more_body": self.more_body}

    async def run_asgi(self, _app: object) -> None:
        """Answer the request (named after the coroutine uvicorn starts for each request)."""
        protocol = self.protocol
        client = protocol.client[0] if protocol.client else "?"
        try:
            answer = await protocol.front_end.answer_infer(
                self.route,
                self.headers,
                client,
                self.receive,
                self.take_whole_body(),
                self.trace,
                self.target,
            )
            if self.disconnected:
                return
            keep_alive = self.keep_alive and not answer.close
            if protocol.front_end.dataplane.draining:
                keep_alive = False  # the next request should go to a server that is staying up
            if protocol.flow.write_paused:
                await protocol.flow.drain()
            head = _head(answer, keep_alive, protocol.server_state.default_headers, self.cors)
            trace = self.trace
            if trace is not None:
                trace.stamp("HTTP_SEND_START")
            if len(answer.body) <= SMALL_BODY:
                protocol.transport.write(head + answer.body)
            else:  # not copied into one buffer
                protocol.transport.writelines((head, answer.body))
            if trace is not None:
                trace.stamp("HTTP_SEND_END")
        except Exception:  # a bug: the client sees its connection close, the log has the cause
            log.exception("infer exchange failed", extra={"event": "http_exchange_failed"})
            protocol.transport.close()
            return
        finally:
            self.release()
            if self.trace is not None:
                self.trace.finish()
        self.response_complete = True
        if not keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()


class _Wakeup:
    """What a waiting `InferExchange.receive` sleeps on (an `asyncio.Event` costs more)."""

    __slots__ = ("waiter",)

    def __init__(self) -> None:
        self.waiter: asyncio.Future | None = None

    def set(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        self.waiter = loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class RefusedExchange:
    """A request answered from its headers (`_refused_early`): uvicorn's protocol drops the
    body bytes of a cycle whose response is complete."""

    response_complete = True
    message_event = _Wakeup()  # set by uvicorn when the connection is lost: nothing waits


def _cors(front_end: HttpFrontEnd, headers: dict[bytes, bytes]) -> Sequence[Header]:
    """The CORS headers of the answer to a request with `headers` (`server.cors`)."""
    cors = front_end.cors
    return () if cors is None else cors.answer_headers(headers.get(b"origin"))


def _head(
    answer: Answer, keep_alive: bool, default_headers: list, extra: Sequence[Header] = ()
) -> bytes:
    """The status line and headers of `answer`, then `extra` headers."""
    head = [
        STATUS_LINE[answer.status],
        b"content-type: ",
        answer.content_type,
        b"\r\ncontent-length: ",
        str(len(answer.body)).encode(),
        b"\r\n",
    ]
    for name, value in (*default_headers, *answer.headers, *extra):
        head += (name, b": ", value, b"\r\n")
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head)
