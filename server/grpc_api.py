"""gRPC front end: `inference.GRPCInferenceService` on Volley's gRPC server (`server.grpc_server`).

Every RPC translates protobuf to the data plane and back; errors become gRPC status codes,
except on `ModelStreamInfer`, where a failed request gets a response with `error_message` and
the stream stays open (as in Triton).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from server import __version__, auth
from server.dataplane import FORBIDDEN, OUTCOMES, UNAUTHENTICATED, DataPlane
from server.errors import (
    VolleyError,
    invalid,
    shared_memory_unsupported,
    unexpected,
)
from server.grpc_server import Context, GrpcServer, Method
from server.held import HELD
from server.protocol import grpc_codec, grpc_health, grpc_reflection
from server.protocol.model_info import (
    load_override,
    model_metadata,
    server_metadata,
    triton_config,
    unload_dependents,
)
from server.ratelimit import grpc_peer_address
from server.sessions import SHUTTING_DOWN, SessionEnded
from server.streams import FrameAnswer, FrameStream
from server.tracing import TRACER, Trace
from server.types import InferenceRequest

log = logging.getLogger(__name__)

# Requests one stream may have in flight; past it, the stream is not read until one is answered.
MAX_STREAM_INFLIGHT = 256
# The inference methods and the protocol label their requests are counted under.
INFER_METHODS = {"ModelInfer": "grpc", "ModelStreamInfer": "grpc_stream"}
LOG_SETTING_FIELD = {bool: "bool_param", int: "uint32_param", str: "string_param"}


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 gRPC service over the data plane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.repo = dataplane.repository

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self.repo.is_ready(request.name, request.version))
        except VolleyError as exc:
            await _abort(context, exc)

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(
            server_metadata(__version__, self.dataplane.shared_memory is not None),
            pb.ServerMetadataResponse(),
        )

    async def ModelMetadata(self, request, context):
        try:
            served = self.repo.get(request.name, request.version)
        except VolleyError as exc:
            await _abort(context, exc)
        versions = sorted(self.repo.models[request.name].versions)
        doc = model_metadata(served, versions)
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        try:
            served = self.repo.get(request.name, request.version)
        except VolleyError as exc:
            await _abort(context, exc)
        config = json_format.ParseDict(
            triton_config(served.config, served.provider), model_config_pb2.ModelConfig()
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        try:
            stats = await self.dataplane.statistics(request.name, request.version)
        except VolleyError as exc:
            await _abort(context, exc)
        doc = {"model_stats": stats}
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        reached = False
        model = getattr(request, "model_name", "")  # a Malformed request has none
        if model:  # refused before decoding when full (counted by the data plane)
            refused = self.dataplane.refusal(model, request.model_version, "grpc")
            if refused is not None:
                await _abort(context, refused)
        if TRACER.on:
            context.trace = trace_call(model, context)
        try:
            if isinstance(request, Malformed):
                raise invalid(request.message)
            if self.dataplane.rate_limiter is not None:
                self.dataplane.admit(grpc_peer_address(context.peer()))
            decoded = grpc_codec.decode_request(request)
            remaining = context.time_remaining()
            if remaining is not None and "timeout" not in decoded.parameters:
                # A client deadline bounds the queue wait too: no work for a caller who left.
                decoded.parameters["timeout"] = max(int(remaining * 1e6), 1)
            reached = True  # from here on the data plane counts the outcome
            decoded.trace = context.trace
            response = await self.dataplane.infer(decoded, "grpc")
            return grpc_codec.encode_response_bytes(response)
        except Exception as exc:  # a bug: the client gets a request id, the log the details
            await self._refuse(context, exc, model, counted=reached)

    async def _refuse(self, context: Context, exc: Exception, model: str, counted: bool) -> None:
        """End a ModelInfer call that raised `exc` (counted here unless the data plane `counted`
        it). Its own frame, not the handler's, holds the error: one kept in a local of the frame
        that caught it forms a cycle with its traceback (see `HttpFrontEnd._error_answer`)."""
        error = exc if isinstance(exc, VolleyError) else unexpected(exc, model=model)
        if not counted:
            self.dataplane.count_rejected(model, "grpc", OUTCOMES[error.kind])
        await _abort(context, error)

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests are handled concurrently (so they batch together); each answer is written
        as soon as it is ready, carrying its request's id. Frames to a pipeline model are a
        camera session instead: latest-frame-wins (`server.streams`). On shutdown the stream
        answers every request it read, then ends with UNAVAILABLE: the rest were not taken."""
        # Bounded: when the client stops reading answers, reading its requests stops too.
        answers: asyncio.Queue = asyncio.Queue(maxsize=MAX_STREAM_INFLIGHT)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def emit_frame(answer: FrameAnswer) -> None:
            await answers.put(_frame_message(answer))

        frames = FrameStream(self.dataplane, emit_frame, "grpc_stream")

        async def answer(request: pb.ModelInferRequest, decoded: InferenceRequest) -> None:
            try:
                response = await self.dataplane.infer(decoded, "grpc_stream")
                message = pb.ModelStreamInferResponse(
                    infer_response=grpc_codec.encode_response(response)
                )
            except VolleyError as exc:
                message = _stream_error(request, exc.message)
            except Exception as exc:  # never let one request break the stream
                message = _stream_error(request, unexpected(exc, model=request.model_name).message)
            await answers.put(message)

        client = grpc_peer_address(context.peer())

        async def take(request: pb.ModelInferRequest) -> None:
            try:
                self.dataplane.admit(client)
                decoded = grpc_codec.decode_request(request)
            except VolleyError as exc:
                self.dataplane.count_rejected(request.model_name, "grpc_stream", OUTCOMES[exc.kind])
                await answers.put(_stream_error(request, exc.message))
                return
            if frames.takes(decoded):
                await frames.submit(decoded)
                return
            task = asyncio.create_task(answer(request, decoded))
            HELD.hold(task)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if len(tasks) >= MAX_STREAM_INFLIGHT:  # stop reading (the client's window closes)
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)

        malformed: list[Malformed] = []  # a message that did not parse ends the stream
        session = self.dataplane.open_session()  # ended on shutdown

        cut: list[SessionEnded] = []  # the server ended the stream before the client did

        async def read() -> None:
            incoming = aiter(request_iterator)
            try:
                while True:
                    try:
                        request = await session.receive(incoming.__anext__)
                    except StopAsyncIteration:
                        break
                    except SessionEnded as ended:
                        cut.append(ended)
                        break
                    if isinstance(request, Malformed):
                        self.dataplane.count_rejected("", "grpc_stream", "invalid")
                        malformed.append(request)
                        break
                    try:
                        await take(request)
                    except Exception as exc:  # a bug: this request fails, the stream goes on
                        error = unexpected(exc, model=request.model_name)
                        await answers.put(_stream_error(request, error.message))
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                await frames.finish()
            finally:
                await answers.put(done)

        reader = asyncio.create_task(read())
        try:
            while (message := await answers.get()) is not done:
                yield message
            if malformed:  # after answering every request taken before it
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed[0].message)
            if cut:  # what the client sent after the requests answered was not taken
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            session.close()
            reader.cancel()
            frames.close()
            for task in list(tasks):
                task.cancel()

    async def RepositoryIndex(self, request, context):
        rows = self.repo.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    async def RepositoryModelLoad(self, request, context):
        params = {k: _repository_parameter(v) for k, v in request.parameters.items()}
        try:
            override = load_override(request.model_name, params)
            await self.dataplane.load(request.model_name, override)
        except VolleyError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        params = {k: _repository_parameter(v) for k, v in request.parameters.items()}
        try:
            await self.dataplane.unload(request.model_name, unload_dependents(params))
        except VolleyError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    async def LogSettings(self, request, context):
        """Triton's logging extension: no settings asks for them, some change them."""
        settings = self.dataplane.log_settings()
        if request.settings:
            changes = {
                name: None if (kind := value.WhichOneof("parameter_choice")) is None
                else getattr(value, kind)
                for name, value in request.settings.items()
            }  # fmt: skip
            try:
                settings = await self.dataplane.update_log_settings(changes)
            except VolleyError as exc:
                await _abort(context, exc)
        answer = pb.LogSettingsResponse()
        for name, value in settings.items():
            setattr(answer.settings[name], LOG_SETTING_FIELD[type(value)], value)
        return answer

    # System shared memory is the data plane's (`server/shm.py`, with --allow-client-shm; off,
    # status lists no region and register says so). CUDA shared memory is not supported: status
    # lists no region, unregister has nothing to do (perf_analyzer unregisters all at start),
    # register says so plainly.
    async def SystemSharedMemoryStatus(self, request, context):
        answer = pb.SystemSharedMemoryStatusResponse()
        if self.dataplane.shared_memory is None:
            return answer  # none can be registered
        try:
            regions = self.dataplane.shared_memory.status(request.name)
        except VolleyError as exc:
            await _abort(context, exc)
        for region in regions:
            status = answer.regions[region["name"]]
            status.name, status.key = region["name"], region["key"]
            status.offset, status.byte_size = region["offset"], region["byte_size"]
        return answer

    async def SystemSharedMemoryUnregister(self, request, context):
        try:
            await self.dataplane.unregister_shared_memory(request.name)
        except VolleyError as exc:
            await _abort(context, exc)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryRegister(self, request, context):
        try:
            await self.dataplane.register_shared_memory(
                request.name, request.key, request.offset, request.byte_size
            )
        except VolleyError as exc:
            await _abort(context, exc)
        return pb.SystemSharedMemoryRegisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        await _abort(context, shared_memory_unsupported("cuda"))

    async def TraceSetting(self, request, context):
        """Triton's trace extension: no settings asks for them, some change them (a setting
        with no value goes back to the global one, or globally to the start-up one)."""
        model = request.model_name
        try:
            if request.settings:
                changes = {name: list(value.value) for name, value in request.settings.items()}
                settings = await self.dataplane.update_trace_settings(model, changes)
            else:
                settings = self.dataplane.trace_settings(model)
        except VolleyError as exc:
            await _abort(context, exc)
        answer = pb.TraceSettingResponse()
        for name, value in settings.items():
            answer.settings[name].value.extend(value if isinstance(value, list) else [value])
        return answer


def trace_call(model: str, context: Context) -> Trace | None:
    """A trace for this ModelInfer call if it is one to trace, with when it was read."""
    trace = TRACER.sample(model)
    if trace is not None:
        now = time.perf_counter_ns()
        trace.stamp("GRPC_WAITREAD_START", context.opened_ns or now)
        trace.stamp("GRPC_WAITREAD_END", context.read_ns or now)
    return trace


class Malformed:
    """What a request that protobuf cannot parse becomes, so the servicer can refuse it with
    INVALID_ARGUMENT (an exception in a deserializer would be answered UNKNOWN)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(message_class: type) -> Callable[[bytes], object]:
    parse = message_class.FromString
    what = f"not a valid {message_class.DESCRIPTOR.full_name} message"

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError:
            return Malformed(what)

    return deserialize


def _refusing_malformed(method: Callable) -> Callable:
    async def handler(request: object, context: Context) -> object:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handler


def _serialized(answer: bytes) -> bytes:
    return answer


def _methods(servicer: InferenceServicer) -> dict[str, Method]:
    """The service's methods by path, with deserializers that turn an unparsable message into
    `Malformed` instead of an exception."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {}
    for method in service.methods:
        deserialize = _lenient(getattr(pb, method.input_type.name))
        serialize = getattr(pb, method.output_type.name).SerializeToString
        implementation = getattr(servicer, method.name)
        if method.client_streaming:  # ModelStreamInfer: Malformed is handled in the stream
            served = Method(implementation, deserialize, serialize, streaming=True)
        elif method.name == "ModelInfer":  # the hot path: it checks (and counts) Malformed itself
            served = Method(implementation, deserialize, _serialized)  # and answers in bytes
        else:
            served = Method(_refusing_malformed(implementation), deserialize, serialize)
        methods[f"/{service.full_name}/{method.name}"] = served
    return methods


def _health_methods(dataplane: DataPlane) -> dict[str, Method]:
    """`grpc.health.v1.Health/Check`: SERVING while the server is ready (as
    `/v2/health/ready`), NOT_SERVING otherwise (loading, a model down with strict readiness,
    draining); NOT_FOUND for a service this server does not have. Public, like liveness:
    probes send no key."""

    async def check(request: object, context: Context) -> object:
        if request.service not in grpc_health.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        serving = grpc_health.SERVING if dataplane.ready else grpc_health.NOT_SERVING
        return grpc_health.HealthCheckResponse(status=serving)

    deserialize = _lenient(grpc_health.HealthCheckRequest)
    serialize = grpc_health.HealthCheckResponse.SerializeToString
    return {auth.GRPC_HEALTH_CHECK: Method(_refusing_malformed(check), deserialize, serialize)}


def _reflection_methods() -> dict[str, Method]:
    """gRPC server reflection (`server.protocol.grpc_reflection`): a message that does not
    parse ends the stream with INVALID_ARGUMENT after the answers before it."""
    servicer = grpc_reflection.reflection_servicer()
    messages = grpc_reflection.reflection_pb2

    async def info(requests: AsyncIterator[object], context: Context) -> AsyncIterator[object]:
        malformed: list[Malformed] = []

        async def parsed() -> AsyncIterator[object]:
            async for request in requests:
                if isinstance(request, Malformed):
                    malformed.append(request)
                    return
                yield request

        async for answer in servicer.ServerReflectionInfo(parsed(), context):
            yield answer
        if malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed[0].message)

    deserialize = _lenient(messages.ServerReflectionRequest)
    serialize = messages.ServerReflectionResponse.SerializeToString
    method = Method(info, deserialize, serialize, streaming=True)
    return dict.fromkeys(grpc_reflection.PATHS, method)


def _repository_parameter(param: pb.ModelRepositoryParameter) -> object:
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def _frame_message(answer: FrameAnswer) -> pb.ModelStreamInferResponse:
    """A stream frame's answer: its response (processed or skipped), or an error naming it."""
    if answer.response is None:
        return pb.ModelStreamInferResponse(
            error_message=answer.error, infer_response=pb.ModelInferResponse(id=answer.id)
        )
    return pb.ModelStreamInferResponse(infer_response=grpc_codec.encode_response(answer.response))


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
    )


async def _abort(context: Context, error: VolleyError) -> None:
    await context.abort(error.kind.grpc_code, error.message)


def _api_key_check(keys: auth.ApiKeys, dataplane: DataPlane):
    """Refuses calls whose `authorization: Bearer <key>` metadata does not reach the method:
    UNAUTHENTICATED without a known key, PERMISSION_DENIED with too small a scope."""

    def check(path: str, metadata: dict[str, str]) -> tuple[grpc.StatusCode, str] | None:
        needed = auth.grpc_scope(path)
        if needed is None:
            return None
        refused = auth.refusal(keys, auth.bearer(metadata.get("authorization")), needed)
        if refused is None:
            return None
        protocol = INFER_METHODS.get(path.rsplit("/", 1)[-1])
        if protocol is not None:  # the model is not known before the request is read
            dataplane.count_rejected("", protocol, FORBIDDEN if refused[0] else UNAUTHENTICATED)
        log.warning(
            "call refused",
            extra={"event": "auth_refused", "method": path, "reason": refused[1]},
        )
        authenticated, message = refused
        code = (
            grpc.StatusCode.PERMISSION_DENIED if authenticated else grpc.StatusCode.UNAUTHENTICATED
        )
        return code, message

    return check


def create_grpc_server(
    dataplane: DataPlane,
    max_message_bytes: int,
    keys: auth.ApiKeys | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> GrpcServer:
    """The inference service on a gRPC server (TLS with `ssl_context`; API keys checked when
    `keys` are given); `start` it on a port."""
    check = _api_key_check(keys, dataplane) if keys is not None else None
    methods = {
        **_methods(InferenceServicer(dataplane)),
        **_health_methods(dataplane),
        **_reflection_methods(),
    }
    return GrpcServer(methods, max_message_bytes, check, ssl_context)
