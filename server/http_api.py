"""HTTP front end: the KServe v2 REST protocol with Triton's extensions.

`POST .../infer` is answered by `HttpFrontEnd.answer_infer`, which the HTTP connection protocol
(`server.http_connection`) calls without ASGI, because it is the hot path and FastAPI's routing
and uvicorn's ASGI machinery cost more than the whole fraud model (measured in
bench/RESULTS.md). Every other route is a FastAPI route. Both only translate between HTTP and
the data plane; errors are always `{"error": "..."}` with the status of their kind.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException

from server import __version__, auth, metrics
from server.cors import CorsPolicy, same_origin
from server.dataplane import FORBIDDEN, OUTCOMES, UNAUTHENTICATED, DataPlane
from server.errors import (
    ErrorKind,
    VolleyError,
    invalid,
    shared_memory_unsupported,
    unexpected,
)
from server.protocol import http_codec, image_body, response_compression
from server.protocol.json_offload import OFFLOAD_BYTES, JsonOffload
from server.protocol.model_info import (
    load_override,
    model_metadata,
    server_metadata,
    triton_config,
    unload_dependents,
)
from server.tracing import TRACER, Trace
from server.types import InferenceRequest
from server.websocket import serve_frames

log = logging.getLogger(__name__)

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

STATIC = Path(__file__).parent / "static"
INFER_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?/infer$")
JSON = "application/json"
OCTET_STREAM = b"application/octet-stream"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def error_body(message: str) -> bytes:
    """The v2 error body."""
    return orjson.dumps({"error": message})


def error_headers(error: VolleyError) -> list[tuple[bytes, bytes]]:
    """Extra headers for an error: overloaded clients are told when to come back."""
    if error.kind in (ErrorKind.QUEUE_FULL, ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE):
        return [(b"retry-after", b"1")]
    return []


class Answer(NamedTuple):
    """An HTTP response to write: what `HttpFrontEnd.answer_infer` returns."""

    status: int
    body: bytes
    content_type: bytes = JSON.encode()
    headers: Sequence[tuple[bytes, bytes]] = ()
    close: bool = False  # the body was left unread: close the connection after this answer


class HttpFrontEnd:
    """The ASGI application: the infer fast path in front of the FastAPI control routes.

    Infer requests normally never reach it as ASGI: the HTTP connection protocol
    (`server.http_connection`) calls `answer_infer` directly. Through ASGI they get the same
    answer, so the application also works behind any ASGI server.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        max_request_bytes: int,
        max_json_bytes: int,
        keys: auth.ApiKeys | None = None,
        cors: CorsPolicy | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.keys = keys
        self.cors = cors  # None: no CORS header is ever sent
        self.max_request_bytes = max_request_bytes
        self.max_json_bytes = max_json_bytes
        self.offload = JsonOffload()
        self.control = control_app(dataplane, max_json_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.dataplane.draining and scope["type"] == "http":
            send = _closing(send)
        if self.cors is not None and scope["type"] == "http":
            origin = _scope_header(scope, b"origin")
            preflight = _scope_header(scope, b"access-control-request-method") is not None
            if scope["method"] == "OPTIONS" and preflight:  # before any API-key check
                await self._answer_preflight(origin, send)
                return
            allowed = self.cors.answer_headers(origin)
            if allowed:
                send = _adding_headers(send, allowed)
        infer = INFER_ROUTE.match(scope["path"]) if scope["type"] == "http" else None
        if infer and scope["method"] == "POST":
            client = (scope.get("client") or ("?",))[0]
            trace = TRACER.sample(infer[1]) if TRACER.on else None
            try:
                target = scope["raw_path"] + b"?" + scope["query_string"]
                answer = await self.answer_infer(
                    infer, dict(scope["headers"]), client, receive, trace=trace, target=target
                )
                await _send_answer(send, answer)
            finally:
                if trace is not None:
                    trace.finish()
            return
        if scope["type"] == "websocket" and not self._origin_allowed(scope):
            origin = (_scope_header(scope, b"origin") or b"").decode("latin-1")
            await receive()  # the connect event; then refuse the handshake (403)
            reason = f"origin {origin!r} may not open a stream here (--cors-origin)"
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return
        guarded = self.keys is not None and scope["type"] in ("http", "websocket")
        if guarded and not await self._authorized(scope, receive, send):
            return
        if infer:
            body = error_body("Method Not Allowed: infer takes POST")
            await _send(send, 405, body, JSON, [(b"allow", b"POST")])
            return
        await self.control(scope, receive, send)

    async def _answer_preflight(self, origin: bytes | None, send: Send) -> None:
        """A browser asks whether a page of `origin` may call: 204 with what it may send, or
        403 for an origin not allowed (`--cors-origin`)."""
        headers = self.cors.preflight_headers(origin)
        if headers:
            await _send(send, 204, b"", JSON, headers)
            return
        shown = origin.decode("latin-1") if origin is not None else "none"
        body = error_body(f"origin {shown!r} may not call this server (--cors-origin)")
        await _send(send, 403, body, JSON)

    def _origin_allowed(self, scope: Scope) -> bool:
        """A WebSocket from a browser page is taken from the server's own origin or one
        `--cors-origin` allows: browsers apply no CORS to WebSockets, so without this any page
        a user opens could stream frames to a server on their network. Clients that are not
        browsers send no Origin and are not concerned."""
        origin = _scope_header(scope, b"origin")
        if origin is None:
            return True
        if same_origin(origin, _scope_header(scope, b"host")):
            return True
        return self.cors is not None and bool(self.cors.answer_headers(origin))

    async def _authorized(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Whether the call's API key reaches its route; if not, the refusal is sent."""
        presented = _bearer(dict(scope["headers"]))
        if presented is None and scope["type"] == "websocket":  # browsers cannot set headers
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            presented = query.get("api_key", [None])[0]
        client = (scope.get("client") or ("?",))[0]
        refused = self._refusal(scope["path"], presented, client)
        if refused is None:
            return True
        status, message = refused
        if scope["type"] == "websocket":
            await receive()  # the connect event; then refuse the handshake
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        else:
            await _send_answer(send, _refusal_answer(status, message))
        return False

    def _key_refusal(self, path: str, presented: str | None) -> tuple[bool, str] | None:
        """(authenticated, why) for a call whose API key does not reach `path`, or None."""
        needed = auth.http_scope(path)
        return None if needed is None else auth.refusal(self.keys, presented, needed)

    def _refusal(self, path: str, presented: str | None, client: str) -> tuple[int, str] | None:
        """(401 or 403, why) for a call whose API key does not reach `path` (logged), or None."""
        refused = self._key_refusal(path, presented)
        if refused is None:
            return None
        authenticated, message = refused
        log.warning(
            "call refused",
            extra={"event": "auth_refused", "path": path, "client": client, "reason": message},
        )
        return (403 if authenticated else 401), message

    def early_refusal(self, route: re.Match, headers: dict[bytes, bytes]) -> Answer | None:
        """The answer to an infer request that its model refuses before any work (full,
        unloading, or the server draining: `DataPlane.refusal`), made from its headers alone so
        its body need not be read or decoded; None when `answer_infer` must handle it (also
        for a call whose API key is refused: that answer says 401 / 403)."""
        if self.keys is not None and self._key_refusal(route.string, _bearer(headers)):
            return None  # `answer_infer` refuses it (and logs why)
        error = self.dataplane.refusal(route[1], route[2] or "", "http")
        if error is None:
            return None
        return Answer(
            error.kind.http_status, error_body(error.message), headers=error_headers(error)
        )

    async def answer_infer(
        self,
        route: re.Match,
        headers: dict[bytes, bytes],
        client: str,
        receive: Receive,
        body: bytes | None = None,
        trace: Trace | None = None,
        target: bytes = b"",
    ) -> Answer:
        """Answer one `POST /v2/models/{model}[/versions/{version}]/infer` (`route`: its path
        matched by INFER_ROUTE); never raises.

        `receive` yields the body as ASGI `http.request` messages, unless the caller passes the
        whole `body` (the connection read it with the headers); `client` is the peer's address
        (for the rate limit and the log); `trace` is the request's when it is traced; `target`
        the request's path and query (an image body's parameters: `server.protocol.image_body`).
        """
        model, version = route[1], route[2] or ""
        if self.keys is not None:
            refused = self._refusal(route.string, _bearer(headers), client)
            if refused is not None:
                status, message = refused
                outcome = FORBIDDEN if status == 403 else UNAUTHENTICATED
                self.dataplane.count_rejected(model, "http", outcome)
                return _refusal_answer(status, message)
        body_read = reached = False
        try:
            if self.dataplane.rate_limiter is not None:
                self.dataplane.admit(client)
            content_type = headers.get(b"content-type")  # inline: the hot path
            if content_type is not None and content_type[:6].lower() == image_body.IMAGE:
                return await self._answer_image(headers, receive, body, route, target, trace)
            header_length, large = self._check_headers(headers)
            if large:  # streamed to the decoder process as it arrives
                try:
                    if body is None:
                        chunks = self._body_chunks(receive)
                    else:
                        chunks = _one(self._within_limit(body))
                    request = await self.offload.decode(chunks, header_length, model, version)
                finally:
                    self.offload.release()
            else:
                if body is None:
                    body = await self._read_body(headers, receive)
                else:
                    body = self._whole_body(headers, body)
                body_read = True
                request = await self._decode(body, header_length, model, version)
            body_read = reached = True  # from here on the data plane counts the outcome
            request.trace = trace
            response = await self.dataplane.infer(request, "http")
            payload, json_length = http_codec.encode_response(response, request)
            encoding = None
            if len(payload) >= response_compression.MIN_BYTES:
                encoding = response_compression.chosen_encoding(headers.get(b"accept-encoding"))
                if encoding is not None:
                    payload = await response_compression.compressed(payload, encoding)
        except Exception as exc:  # a bug must still answer the client, never hang it
            # Without the whole body read, the rest is not worth reading: close after.
            return self._error_answer(exc, model, counted=reached, close=not body_read)
        encoded = ((b"content-encoding", encoding),) if encoding is not None else ()
        if json_length is None:
            return Answer(200, payload, headers=encoded)
        length = str(json_length).encode()
        extra = [*encoded, (b"inference-header-content-length", length)]
        return Answer(200, payload, OCTET_STREAM, extra)

    async def _answer_image(
        self,
        headers: dict[bytes, bytes],
        receive: Receive,
        body: bytes | None,
        route: re.Match,
        target: bytes,
        trace: Trace | None,
    ) -> Answer:
        """Answer an image body (`server.protocol.image_body`) to a pipeline model."""
        model, version = route[1], route[2] or ""
        body_read = reached = False
        try:
            length = _int_header(headers.get(b"content-length"))
            if length is not None and length > self.max_request_bytes:
                raise self._body_too_large(length)
            if body is None:
                body = await self._read_body(headers, receive)
            else:
                body = self._whole_body(headers, body)
            body_read = True
            if self.dataplane.repository.get(model, version).model.frame_policy is None:
                raise invalid(
                    f"model '{model}' takes v2 inference requests, not an image: an image body "
                    "(Content-Type: image/...) is for detection pipelines such as 'detect'"
                )
            request = image_body.image_request(body, model, version, target)
            request.trace = trace
            reached = True  # from here on the data plane counts the outcome
            response = await self.dataplane.infer(request, "http")
            payload = orjson.dumps(image_body.detections_document(response))
        except Exception as exc:
            return self._error_answer(exc, model, counted=reached, close=not body_read)
        return Answer(200, payload)

    def _error_answer(self, exc: Exception, model: str, counted: bool, close: bool) -> Answer:
        """The answer to an infer request that raised `exc` (counted here unless the data plane
        `counted` it). Its own frame, not the handler's, holds the error: an error kept in a
        local of the frame that caught it would form a cycle with its traceback, and under
        overload those cycles piled up until one collector pass stalled the loop for 100+ ms."""
        error = exc if isinstance(exc, VolleyError) else unexpected(exc, model=model)
        if not counted:
            self.dataplane.count_rejected(model, "http", OUTCOMES[error.kind])
        return Answer(
            error.kind.http_status,
            error_body(error.message),
            headers=error_headers(error),
            close=close,
        )

    def _check_headers(self, headers: dict[bytes, bytes]) -> tuple[int | None, bool]:
        """Check what the headers tell before the body is read: the JSON part's size and the
        body's (413), and for a large uncompressed JSON part a decoder slot (429). Returns the
        binary header length and whether a slot was taken (the body then streams to the
        decoder)."""
        header_length = _int_header(headers.get(b"inference-header-content-length"))
        length = _int_header(headers.get(b"content-length"))
        encoding = headers.get(b"content-encoding")
        identity = encoding is None or encoding.lower() == b"identity"
        declared = header_length if header_length is not None or not identity else length
        if declared is not None:
            self._check_json_size(declared)
        if length is not None and length > self.max_request_bytes:
            raise self._body_too_large(length)
        if declared is None or declared <= OFFLOAD_BYTES or not identity:
            return header_length, False
        self.offload.reserve()
        return header_length, True

    def _body_too_large(self, length: int) -> VolleyError:
        """The 413 of a body whose Content-Length is over --max-request-bytes."""
        return VolleyError(
            ErrorKind.TOO_LARGE,
            f"request body of {length} bytes exceeds {self.max_request_bytes} bytes",
        )

    async def _decode(
        self, body: bytes, header_length: int | None, model: str, version: str
    ) -> InferenceRequest:
        """Decode a body read whole: inline, or in the decoder process when its JSON part turns
        out large (a compressed or chunked body, whose size the headers did not tell)."""
        json_length = len(body) if header_length is None else header_length
        self._check_json_size(json_length)
        if json_length <= OFFLOAD_BYTES:
            return http_codec.decode_request(body, header_length, model, version)
        self.offload.reserve()
        try:
            return await self.offload.decode(_one(body), header_length, model, version)
        finally:
            self.offload.release()

    def _check_json_size(self, size: int) -> None:
        if size > self.max_json_bytes:
            raise VolleyError(
                ErrorKind.TOO_LARGE,
                f"JSON part of the request ({size} bytes) exceeds {self.max_json_bytes} bytes "
                "(--max-json-bytes): send large tensors as binary data",
            )

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """The whole body, as `_whole_body` gives it."""
        first = await receive()  # most bodies arrive in one message
        if first["type"] == "http.request" and not first.get("more_body", False):
            return self._whole_body(headers, first["body"])
        body = b"".join([chunk async for chunk in self._body_chunks(receive, first)])
        return self._whole_body(headers, body)

    def _whole_body(self, headers: dict[bytes, bytes], body: bytes) -> bytes:
        """`body`, all of it, within --max-request-bytes and decompressed (gzip, deflate)."""
        body = self._within_limit(body)
        encoding = headers.get(b"content-encoding")
        if encoding is None:
            return body
        encoding = encoding.lower()
        if encoding in (b"gzip", b"deflate"):
            return _decompress(body, encoding, self.max_request_bytes)
        if encoding != b"identity":
            raise invalid(f"unsupported Content-Encoding '{encoding.decode(errors='replace')}'")
        return body

    def _within_limit(self, body: bytes) -> bytes:
        """`body`, or a 413 where it is larger than --max-request-bytes."""
        if len(body) > self.max_request_bytes:
            raise self._too_large()
        return body

    def _too_large(self) -> VolleyError:
        return VolleyError(
            ErrorKind.TOO_LARGE, f"request body exceeds {self.max_request_bytes} bytes"
        )

    async def _body_chunks(
        self, receive: Receive, first: dict | None = None
    ) -> AsyncIterator[bytes]:
        """The body as it arrives (from message `first`, if one was read already), refused
        (413) once past --max-request-bytes."""
        size = 0
        while True:
            message = first or await receive()
            first = None
            if message["type"] == "http.disconnect":
                raise invalid("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                raise self._too_large()
            yield chunk
            if not message.get("more_body", False):
                return


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    header = headers.get(b"authorization")
    return auth.bearer(header.decode("latin-1") if header is not None else None)


def _refusal_answer(status: int, message: str) -> Answer:
    headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    return Answer(status, error_body(message), headers=headers)


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(response_compression.window_bits(encoding))
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise invalid(f"body is not valid {encoding.decode()} data: {exc}") from None
    if len(out) > limit:
        raise VolleyError(ErrorKind.TOO_LARGE, f"decompressed body exceeds {limit} bytes")
    return out


def _int_header(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise invalid(
            f"header value '{value.decode(errors='replace')}' is not an integer"
        ) from None


async def _send_answer(send: Send, answer: Answer) -> None:
    extra = [*answer.headers, (b"connection", b"close")] if answer.close else [*answer.headers]
    await _send(send, answer.status, answer.body, answer.content_type.decode(), extra)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _scope_header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _adding_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """`send` that adds `headers` to the response."""

    async def send_with_headers(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return send_with_headers


def _closing(send: Send) -> Send:
    """`send` that asks the client to close the connection after this response (draining:
    the next request should go to a server that is staying up)."""

    async def send_and_close(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_and_close


def json_response(content: object, status: int = 200) -> Response:
    """A JSON response serialised with orjson."""
    return Response(orjson.dumps(content), status_code=status, media_type=JSON)


def control_app(dataplane: DataPlane, max_body_bytes: int) -> FastAPI:
    """Health, metadata, config, statistics, repository and metrics routes."""
    app = FastAPI(title="Volley", version=__version__, openapi_url="/v2/openapi.json")
    repo = dataplane.repository

    @app.exception_handler(VolleyError)
    async def volley_error(_: Request, exc: VolleyError) -> Response:
        response = json_response({"error": exc.message}, exc.kind.http_status)
        for key, value in error_headers(exc):
            response.headers[key.decode()] = value.decode()
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        response = json_response({"error": str(exc.detail)}, exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        error = unexpected(exc, path=request.url.path)
        return json_response({"error": error.message}, error.kind.http_status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if dataplane.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": "server is not ready"}, 503)

    @app.get("/v2")
    async def metadata() -> Response:
        return json_response(server_metadata(__version__, dataplane.shared_memory is not None))

    @app.get("/v2/models/stats")
    async def all_stats() -> Response:
        return await model_stats()

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_meta(model: str, version: str = "") -> Response:
        served = repo.get(model, version)
        return json_response(model_metadata(served, sorted(repo.models[model].versions)))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = "") -> Response:
        if repo.is_ready(model, version):
            return json_response({"name": model, "ready": True})
        return json_response({"error": f"model '{model}' is not ready"}, 503)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = "") -> Response:
        served = repo.get(model, version)
        return json_response(triton_config(served.config, served.provider))

    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_stats(model: str = "", version: str = "") -> Response:
        return json_response({"model_stats": await dataplane.statistics(model, version)})

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        body = await _json_body(request, max_body_bytes)
        return json_response(repo.index(ready_only=body.get("ready") is True))

    @app.post("/v2/repository/models/{model}/load")
    async def load(model: str, request: Request) -> Response:
        params = (await _json_body(request, max_body_bytes)).get("parameters", {})
        if not isinstance(params, dict):
            raise invalid("'parameters' must be a JSON object")
        await dataplane.load(model, load_override(model, params))
        return json_response({})

    @app.post("/v2/repository/models/{model}/unload")
    async def unload(model: str, request: Request) -> Response:
        params = (await _json_body(request, max_body_bytes)).get("parameters", {})
        if not isinstance(params, dict):
            raise invalid("'parameters' must be a JSON object")
        await dataplane.unload(model, unload_dependents(params))
        return json_response({})

    @app.get("/v2/logging")
    async def get_log_settings() -> Response:
        return json_response(dataplane.log_settings())

    @app.post("/v2/logging")
    async def update_log_settings(request: Request) -> Response:
        return json_response(
            await dataplane.update_log_settings(await _json_body(request, max_body_bytes))
        )

    @app.get("/v2/systemsharedmemory/status")
    @app.get("/v2/systemsharedmemory/region/{region}/status")
    async def system_shared_memory_status(region: str = "") -> Response:
        regions = dataplane.shared_memory
        if regions is None:
            return json_response([])  # none can be registered
        return json_response(regions.status(region))

    @app.post("/v2/systemsharedmemory/unregister")
    @app.post("/v2/systemsharedmemory/region/{region}/unregister")
    async def system_shared_memory_unregister(region: str = "") -> Response:
        await dataplane.unregister_shared_memory(region)
        return json_response({})

    @app.post("/v2/systemsharedmemory/region/{region}/register")
    async def system_shared_memory_register(region: str, request: Request) -> Response:
        if dataplane.shared_memory is None:  # refused before its body is read
            raise shared_memory_unsupported()
        doc = await _json_body(request, max_body_bytes)
        await dataplane.register_shared_memory(
            region, doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        )
        return json_response({})

    @app.get("/v2/cudasharedmemory/status")
    @app.get("/v2/cudasharedmemory/region/{region}/status")
    async def cuda_shared_memory_status(region: str = "") -> Response:
        return json_response([])  # no region is ever registered

    @app.post("/v2/cudasharedmemory/unregister")
    @app.post("/v2/cudasharedmemory/region/{region}/unregister")
    async def cuda_shared_memory_unregister(region: str = "") -> Response:
        return json_response({})  # nothing to unregister

    @app.post("/v2/cudasharedmemory/region/{region}/register")
    async def cuda_shared_memory_register(region: str) -> Response:
        raise shared_memory_unsupported("cuda")

    @app.get("/v2/trace/setting")
    @app.get("/v2/models/{model}/trace/setting")
    async def get_trace_settings(model: str = "") -> Response:
        return json_response(dataplane.trace_settings(model))

    @app.post("/v2/trace/setting")
    @app.post("/v2/models/{model}/trace/setting")
    async def update_trace_settings(request: Request, model: str = "") -> Response:
        changes = await _json_body(request, max_body_bytes)
        return json_response(await dataplane.update_trace_settings(model, changes))

    @app.websocket("/v2/models/{model}/stream")
    async def frame_stream(websocket: WebSocket, model: str) -> None:
        await serve_frames(websocket, dataplane, model)

    @app.get("/camera")
    async def camera_page() -> Response:
        return FileResponse(STATIC / "camera.html", media_type="text/html")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_TYPE)

    return app


async def _json_body(request: Request, limit: int) -> dict:
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise VolleyError(ErrorKind.TOO_LARGE, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"malformed JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid("request body must be a JSON object")
    return doc


async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app of the metrics port: `/metrics` and nothing else."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/metrics" and scope["method"] == "GET":
        await _send(send, 200, metrics.exposition(), METRICS_TYPE)
    else:
        await _send(send, 404, error_body("Not Found"), JSON)
