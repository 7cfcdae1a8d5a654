"""The protocol-free core of inference: look up, hand over, answer, count.

Both front ends call `DataPlane.infer` with an `InferenceRequest`; nothing here knows HTTP or
protobuf, nor whether the model is a plain ONNX model or a pipeline: each served version is a
`Servable` that validates and answers its own requests.
"""

from __future__ import annotations

import asyncio
import time
from functools import cache

from server import metrics
from server.datatypes import tensor_from_bytes, tensor_to_bytes
from server.errors import (
    ErrorKind,
    VolleyError,
    invalid,
    not_found,
    shared_memory_unsupported,
    unavailable,
)
from server.held import HELD
from server.log_settings import process_settings
from server.ratelimit import RateLimiter
from server.repository import ModelRepository
from server.servable import FramePolicy
from server.sessions import SHUTTING_DOWN, Session
from server.shm import SystemSharedMemory
from server.tracing import TRACER, Trace
from server.types import (
    NO_DATA,
    InferenceRequest,
    InferenceResponse,
    InferTensor,
    SharedMemoryRef,
)

OUTCOMES = {
    ErrorKind.INVALID_ARGUMENT: "invalid",
    ErrorKind.NOT_FOUND: "not_found",
    ErrorKind.TOO_LARGE: "invalid",
    ErrorKind.QUEUE_FULL: "queue_full",
    ErrorKind.RATE_LIMITED: "rate_limited",
    ErrorKind.TIMEOUT: "timeout",
    ErrorKind.UNAVAILABLE: "unavailable",
    ErrorKind.INTERNAL: "failed",
    ErrorKind.UNSUPPORTED: "invalid",
}
# Unary HTTP and gRPC requests are sampled for tracing by their front ends, which record when
# they were read and answered; the data plane samples the others (stream requests and frames).
SAMPLED_BY_FRONT_END = frozenset({"http", "grpc"})
# Requests on long-lived streams: they go on coming until their stream is ended (`end_sessions`)
SESSION_PROTOCOLS = frozenset({"grpc_stream", "websocket"})
UNAUTHENTICATED, FORBIDDEN = "unauthenticated", "forbidden"  # API key missing / scope too small


@cache  # label sets are as many as the series prometheus_client keeps for them anyway
def _outcome_counter(model: str, version: str, protocol: str, outcome: str):
    """The labelled request counter, looked up once per label set (it is on the hot path)."""
    return metrics.hot_counter(metrics.REQUESTS.labels(model, version, protocol, outcome))


class DataPlane:
    """Server-wide state the front ends share: the repository and the draining flag."""

    def __init__(
        self,
        repository: ModelRepository,
        strict_readiness: bool = True,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.repository = repository
        self.strict_readiness = strict_readiness
        self.rate_limiter = rate_limiter
        # Client shared-memory regions, with --allow-client-shm (None: refused).
        self.shared_memory: SystemSharedMemory | None = None
        self.draining = False
        self.arrivals = 0  # requests seen, refused ones included: what `quiesce` watches
        self.sessions_ending = False  # shutting down: open streams are being ended
        self._sessions: set[Session] = set()  # open streams, ended on shutdown
        # in flight per protocol: a plain count here, published to the gauge when scraped
        self.inflight_by_protocol: dict[str, int] = {}
        metrics.refresh_on_scrape(self._publish_inflight)

    def _publish_inflight(self) -> None:
        for protocol, count in self.inflight_by_protocol.items():
            metrics.INFLIGHT.labels(protocol).set(count)

    @property
    def inflight(self) -> int:
        """Inference requests being handled now, over every protocol."""
        return sum(self.inflight_by_protocol.values())

    @property
    def ready(self) -> bool:
        """Ready for traffic: the models of the start loaded (or failed), not draining, and
        (strict) every model it should serve is serving."""
        if self.draining or not self.repository.started:
            return False
        return self.repository.all_ready() if self.strict_readiness else True

    async def infer(
        self, request: InferenceRequest, protocol: str, deadline_ns: int | None = None
    ) -> InferenceResponse:
        """Hand one request to its model and count the outcome.

        `deadline_ns` (perf_counter) is the latest start of its batch, for stream frames.
        """
        by_protocol = self.inflight_by_protocol
        by_protocol[protocol] = by_protocol.get(protocol, 0) + 1
        if protocol not in SESSION_PROTOCOLS:  # a stream's are ended with it, not waited out
            self.arrivals += 1
        served = response = None
        trace = request.trace
        if TRACER.on and protocol not in SAMPLED_BY_FRONT_END:
            trace = request.trace = TRACER.sample(request.model)
            if trace is not None:
                trace.owned = True
        if trace is not None:
            trace.stamp("REQUEST_START")
        try:
            if self.draining:
                raise unavailable(SHUTTING_DOWN)
            shared = request.shared_memory
            if shared:
                self._read_shared_inputs(request)
            served = self.repository.get(request.model, request.version)
            if trace is not None:
                trace_request(trace, request, served.version)
            timeout_us = request_timeout_us(request.parameters) if request.parameters else 0
            # No await between the lookup and the hand-over: a reload cannot slip in between.
            response = await served.model.infer(request, timeout_us, deadline_ns)
            if shared:
                self._write_shared_outputs(request, response)
        except VolleyError as exc:
            # Label by what exists: a client must not mint series with made-up model names.
            model = request.model if request.model in self.repository.models else ""
            version = str(served.version) if served is not None else ""
            _outcome_counter(model, version, protocol, OUTCOMES[exc.kind]).inc()
            raise
        finally:
            by_protocol[protocol] -= 1
            if trace is not None:
                trace_response(trace, response)
        _outcome_counter(request.model, str(served.version), protocol, "success").inc()
        return response

    def refusal(self, model: str, version: str, protocol: str) -> VolleyError | None:
        """The refusal a request to `model` gets now, before its body is read or decoded (the
        server draining, the version unloading or full), counted like `infer`'s outcomes; None
        when it would be taken, or when the lookup fails (its full handling reports that).

        A cheap early answer: at 3x overload most requests are refused, and decoding each only
        to refuse it takes CPU from the ones being served. While the server holds fewer requests
        than the smallest queue limit, no queue can be full (each queued request is held), so
        nothing is looked up: what is refused then (an unloading version) is refused by `infer`.
        """
        if self.draining:
            error = unavailable(SHUTTING_DOWN)
            version = ""
        elif HELD.count < self.repository.smallest_queue_limit:
            return None
        else:
            try:
                served = self.repository.get(model, version)
            except VolleyError:
                return None
            error = served.model.refusal()
            if error is None:
                return None
            version = str(served.version)
        self.arrivals += 1
        self.count_rejected(model, protocol, OUTCOMES[error.kind], version)
        return error

    def _read_shared_inputs(self, request: InferenceRequest) -> None:
        """Fill in the inputs that lie in the client's shared-memory regions."""
        regions = self._regions()
        for tensor in request.inputs:
            if tensor.shared_memory is not None:
                what = f"input '{tensor.name}'"
                raw = regions.read(tensor.shared_memory, what)
                try:
                    tensor.data = tensor_from_bytes(raw, tensor.datatype, tensor.shape)
                except VolleyError as exc:
                    raise invalid(f"{what} in shared memory: {exc.message}") from None

    def _write_shared_outputs(self, request: InferenceRequest, response: InferenceResponse) -> None:
        """Write the outputs the client wants in its shared-memory regions there."""
        regions = self._regions()
        wanted = {o.name: o.shared_memory for o in request.outputs if o.shared_memory}
        for i, tensor in enumerate(response.outputs):
            ref = wanted.get(tensor.name)
            if ref is not None:
                data = tensor_to_bytes(tensor.data)
                regions.write(ref, data, f"output '{tensor.name}'")
                placed = SharedMemoryRef(ref.region, len(data), ref.offset)
                response.outputs[i] = InferTensor(
                    tensor.name, tensor.datatype, tensor.shape, NO_DATA, placed
                )

    async def register_shared_memory(
        self, name: str, key: str, offset: int, byte_size: int
    ) -> None:
        """A client's registration of a system shared-memory region (`--allow-client-shm`)."""
        self._regions().register(name, key, offset, byte_size)

    async def unregister_shared_memory(self, name: str = "") -> None:
        """Forget region `name` (every region when empty); nothing to do where shm is off."""
        if self.shared_memory is not None:
            self.shared_memory.unregister(name)

    def _regions(self) -> SystemSharedMemory:
        if self.shared_memory is None:
            raise shared_memory_unsupported()
        return self.shared_memory

    async def quiesce(self, quiet_seconds: float, timeout: float) -> bool:
        """Wait, while draining, until nothing is in flight and no request has arrived for
        `quiet_seconds` (clients have seen the refusals and stopped), or `timeout` passes.

        Until then the listeners stay open and refuse new work with 503 / UNAVAILABLE, so a
        request a client sent during the drain is refused, never cut off with its connection.
        Returns whether the server went quiet in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.arrivals
            await asyncio.sleep(min(quiet_seconds, max(deadline - time.monotonic(), 0)))
            if self.arrivals == seen and self.inflight == 0:
                return True
        return False

    def open_session(self) -> Session:
        """Register a long-lived stream (a gRPC `ModelStreamInfer` call, a WebSocket camera
        session), which `end_sessions` ends on shutdown (`server.sessions`); the stream closes
        its session when it is over."""
        session = Session(self._sessions.discard)
        if self.sessions_ending:  # opened while the server stops: ended at once
            session.end()
        self._sessions.add(session)
        return session

    def end_sessions(self) -> int:
        """Shutting down: stop reading every open stream; each answers what it took.
        Returns how many were open."""
        self.sessions_ending = True
        for session in list(self._sessions):
            session.end()
        return len(self._sessions)

    def admit(self, client: str) -> None:
        """Refuse (429) a client over its rate limit, when `--rate-limit` is set."""
        if self.rate_limiter is not None:
            self.rate_limiter.check(client)

    def count_rejected(self, model: str, protocol: str, outcome: str, version: str = "") -> None:
        """Count a request refused before it reached a model (undecodable, too large, not
        authenticated, or refused early: `refusal`). The model label is kept only for a model
        that exists: a client must not mint series with made-up names."""
        label = model if model in self.repository.models else ""
        _outcome_counter(label, version, protocol, outcome).inc()

    async def statistics(self, model: str = "", version: str = "") -> list[dict]:
        """The v2 statistics (`model_stats` entries) of one version, a model's, or all."""
        return [v.stats.as_dict() for v in self.repository.served_versions(model, version)]

    async def load(self, model: str, override: dict | None = None) -> None:
        """A client's load request (explicit model control)."""
        await self.repository.request_load(model, override)

    async def unload(self, model: str, dependents: bool = False) -> None:
        """A client's unload request (explicit model control); `dependents`: the models it
        runs too (Triton's `unload_dependents`)."""
        for name in self.unloaded_with(model, dependents):
            await self.repository.request_unload(name)

    def unloaded_with(self, model: str, dependents: bool) -> list[str]:
        """What an unload of `model` unloads: it, and with `dependents` the models it runs that
        no other served model runs (`ModelRepository.dependents`)."""
        return [model, *self.repository.dependents(model)] if dependents else [model]

    def log_settings(self) -> dict[str, object]:
        """The logging extension's settings (`server.log_settings`)."""
        return dict(process_settings().current)

    async def update_log_settings(self, changes: dict[str, object]) -> dict[str, object]:
        """Change some log settings (a client error names a bad one); returns them all."""
        settings = process_settings()
        return settings.apply(settings.check(changes))

    def trace_settings(self, model: str = "") -> dict[str, object]:
        """The trace extension's settings of `model` (or the global ones)."""
        self._known(model)
        return TRACER.settings(model)

    async def update_trace_settings(self, model: str, changes: dict) -> dict[str, object]:
        """Change the trace settings of `model` (or the global ones); returns them all."""
        self._known(model)
        return TRACER.apply(model, changes)

    def _known(self, model: str) -> None:
        """Trace settings are kept for the repository's models only (a client must not grow
        them with made-up names)."""
        if model and model not in self.repository.models:
            raise not_found(f"Request for unknown model: '{model}' is not found")

    def frame_policy(self, model: str, version: str) -> FramePolicy | None:
        """How a stream's frames to this model are served (None: as plain requests)."""
        try:
            return self.repository.get(model, version).model.frame_policy
        except VolleyError:
            return None


def trace_request(trace: Trace, request: InferenceRequest, version: int | str) -> None:
    """What a trace records of a request once its model version is known."""
    trace.version = str(version)
    trace.request_id = request.id
    if trace.tensors:
        for tensor in request.inputs:
            trace.tensor("TENSOR_QUEUE_INPUT", tensor.name, tensor.datatype, tensor.data)


def trace_response(trace: Trace, response: InferenceResponse | None) -> None:
    """The end of a traced request (`response`: None if it failed); a trace the data plane
    started is finished here, one a front end started is finished by it once sent."""
    trace.stamp("REQUEST_END")
    if trace.tensors and response is not None:
        for tensor in response.outputs:
            trace.tensor("TENSOR_BACKEND_OUTPUT", tensor.name, tensor.datatype, tensor.data)
    if trace.owned:
        trace.finish()


def request_timeout_us(parameters: dict) -> int:
    """The `timeout` request parameter (µs), 0 when absent."""
    value = parameters.get("timeout", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"parameter 'timeout' must be a non-negative integer (µs), got {value!r}")
    return value
