"""The server process: repository, HTTP, gRPC and metrics listeners, and graceful shutdown.

SIGTERM (or SIGINT): readiness turns false and new inference requests are refused with 503 /
UNAVAILABLE (HTTP responses then close their connection); once clients have gone quiet, every
queued and running request is answered, then the listeners close and the process exits 0, all
within `--shutdown-timeout`.

With `--workers N` each worker process runs `serve` with its `Worker` (`server.worker`): it loads
its models first, then serves the connections the supervisor passes to it (`server.handoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server import metrics
from server.auth import ApiKeys
from server.busy_poll import BusyPoll
from server.cors import CorsPolicy
from server.dataplane import DataPlane
from server.grpc_api import create_grpc_server
from server.grpc_server import GrpcServer
from server.handoff import GRPC, HTTP, METRICS
from server.held import HELD
from server.http_api import HttpFrontEnd, metrics_app
from server.http_connection import protocol_for
from server.ratelimit import RateLimiter, SharedRateLimiter
from server.repository import ModelRepository
from server.settings import ServeSettings, StartupError
from server.shm import SystemSharedMemory
from server.tls import TlsFiles
from server.tracing import TRACER

if TYPE_CHECKING:
    from server.worker import Worker

log = logging.getLogger(__name__)

# Draining waits until no request has arrived for this long (and nothing is in flight).
DRAIN_QUIET_SECONDS = 0.5


class _Listener(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process (several share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _listener(
    app,
    host: str,
    port: int,
    timeout: float,
    keepalive_timeout: float,
    max_message_bytes: int = 16 * 1024 * 1024,
    tls: TlsFiles | None = None,
    http: type[HttpToolsProtocol] | str = "httptools",
) -> _Listener:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(timeout),
        timeout_keep_alive=keepalive_timeout,  # uvicorn says int; it only goes to call_later
        ws_max_size=max_message_bytes,
        # Measured on the infer hot path: each of these costs per request and adds nothing here.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        **(tls.uvicorn_options() if tls is not None else {}),
    )
    return _Listener(config)


def tune_garbage_collector() -> None:
    """Make cyclic-GC pauses rare: they were what set p99 latency under load.

    Requests free everything by reference counting (tests/test_cyclic_garbage.py holds every
    request path to that), yet every 700 allocations the default collector ran, and its full
    passes walked every object of the loaded models and libraries. Interleaved runs at
    concurrency 64 are in bench/RESULTS.md.
    """
    gc.collect()
    gc.freeze()  # what exists after loading is long-lived: keep it out of every later pass
    gc.set_threshold(100_000, 50, 1000)


async def _started(listeners: list[_Listener], tasks: list[asyncio.Task]) -> None:
    """Return once every HTTP listener has bound its port ("listening" must be true)."""
    while not all(listener.started for listener in listeners):
        for task in tasks:
            if task.done():
                task.result()  # a listener that stopped at start-up: raise what it raised
                raise StartupError("an HTTP listener stopped while starting")
        await asyncio.sleep(0.005)


async def serve(settings: ServeSettings, worker: Worker | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code."""
    if settings.switch_interval_ms is not None:
        sys.setswitchinterval(settings.switch_interval_ms / 1000)
    TRACER.configure(settings.trace, settings.trace_file, None if worker is None else worker.index)
    repository = ModelRepository(settings.model_repository, settings.model_control)
    limiter = None
    if settings.rate_limit > 0:
        rate, burst = settings.rate_limit, settings.rate_burst or None
        if worker is None:
            limiter = RateLimiter(rate, burst)
        else:  # one client's connections reach several workers: one table of buckets for all
            limiter = SharedRateLimiter(worker.rate_limits, rate, burst)
    if worker is None:
        dataplane = DataPlane(repository, settings.strict_readiness, limiter)
    else:
        dataplane = worker.dataplane(repository, settings.strict_readiness, limiter)
    if settings.allow_client_shm:
        dataplane.shared_memory = SystemSharedMemory(settings.max_request_bytes)
    metrics.enable_gpu_metrics()

    keys = ApiKeys.load(settings.api_keys) if settings.api_keys is not None else None
    if keys is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "no --api-keys: anyone who reaches these ports may call every API",
            extra={"event": "no_authentication", "host": settings.host},
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.busy_poll_us:
        HELD.busy_poll = BusyPoll(loop, settings.busy_poll_us, settings.busy_poll_always)
    if worker is not None:
        # The supervisor passes a worker connections once it says it serves: it must serve what
        # the others serve by then (its models, and the load/unload requests they took).
        await repository.load_at_start(settings.load_models)
        await worker.join()

    tls = settings.tls
    cors = CorsPolicy(settings.cors_origins) if settings.cors_origins else None
    front_end = HttpFrontEnd(
        dataplane, settings.max_request_bytes, settings.max_json_bytes, keys, cors
    )
    http = _listener(
        front_end,
        settings.host,
        settings.http_port,
        settings.shutdown_timeout,
        settings.http_keepalive_timeout,
        settings.max_request_bytes,
        tls,
        protocol_for(front_end),
    )
    grpc_server = create_grpc_server(
        dataplane,
        settings.max_request_bytes,
        keys,
        tls.grpc_context() if tls is not None else None,
    )
    listeners = [http]
    if settings.metrics_port:
        metrics_tls = tls if settings.metrics_tls else None
        listeners.append(
            _listener(
                metrics_app,
                settings.host,
                settings.metrics_port,
                settings.shutdown_timeout,
                settings.http_keepalive_timeout,
                tls=metrics_tls,
            )
        )

    if worker is None:
        await grpc_server.start(settings.host, settings.grpc_port)
    tasks = [asyncio.create_task(_serve_listener(listener, worker)) for listener in listeners]
    await _started(listeners, tasks)
    if worker is not None:  # the supervisor accepts, and passes connections on
        _receive_connections(worker, listeners, grpc_server)
    log.info(
        "listening",
        extra={
            "event": "listening",
            "http_port": settings.http_port,
            "grpc_port": settings.grpc_port,
            "metrics_port": settings.metrics_port,
            "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
        },
    )
    poller = None
    if worker is None:
        await repository.load_at_start(settings.load_models)
        if settings.model_control == "poll":  # with workers, the supervisor has them poll
            poller = asyncio.create_task(repository.poll_forever(settings.poll_seconds))
    tune_garbage_collector()
    publisher = None
    if worker is None:
        log.info("ready", extra={"event": "ready", "models": repository.index()})
    else:  # the supervisor says "ready" once every worker is
        log.info("worker ready", extra={"event": "worker_ready", "models": repository.index()})
        await worker.serving()
        # a scrape reaches one worker: the others publish their plain-number gauges meanwhile
        publisher = asyncio.create_task(metrics.refresh_forever())

    await stop.wait()
    deadline = time.monotonic() + settings.shutdown_timeout
    await _drain(deadline, dataplane, repository, poller)
    if worker is not None:
        worker.connections.stop()
    await grpc_server.stop(max(deadline - time.monotonic(), 0.0))
    for listener in listeners:
        # A client that stopped reading (a TLS peer that never answers close_notify) must not
        # hold the exit past the budget: uvicorn would wait its full graceful timeout again.
        listener.config.timeout_graceful_shutdown = max(int(deadline - time.monotonic()), 1)
        listener.should_exit = True
    await asyncio.gather(*tasks)
    front_end.offload.close()
    if publisher is not None:
        publisher.cancel()
        metrics.refresh()  # the counts as they end, for the scrapes of the other workers
    if worker is not None:
        await worker.leave()
    HELD.busy_poll = None
    TRACER.close()
    log.info("stopped", extra={"event": "stopped"})
    return 0


async def _serve_listener(listener: _Listener, worker: Worker | None) -> None:
    """Serve on the listener's port (bound by uvicorn), or a worker's share of it (passed)."""
    await listener.serve(sockets=None if worker is None else [])


def _receive_connections(
    worker: Worker, listeners: list[_Listener], grpc_server: GrpcServer
) -> None:
    """Serve the connections the supervisor passes to this worker, with the same protocols
    (and TLS) as a listener of its own would."""
    receiver = worker.connections
    for kind, listener in zip((HTTP, METRICS), listeners, strict=False):
        config = listener.config
        listener.server_state.connections = receiver.tracked()
        factory = functools.partial(
            config.http_protocol_class,
            config=config,
            server_state=listener.server_state,
            app_state=listener.lifespan.state,
        )
        receiver.serve(kind, factory, config.ssl)
    grpc_server.connections = receiver.tracked()
    receiver.serve(GRPC, grpc_server.new_connection, grpc_server.ssl_context)
    receiver.start()


async def _drain(
    deadline: float,
    dataplane: DataPlane,
    repository: ModelRepository,
    poller: asyncio.Task | None,
) -> None:
    """Refuse new work, wait for clients to go quiet, answer what was accepted.

    The listeners stay open meanwhile: closing them while clients still send would turn
    requests already on the wire into resets and CANCELLED calls that nobody can tell from
    lost work. Everything is bounded by `deadline` (time.monotonic).
    """
    log.info("draining", extra={"event": "draining"})
    dataplane.draining = True
    if poller is not None:
        poller.cancel()
    quiet = await dataplane.quiesce(DRAIN_QUIET_SECONDS, deadline - time.monotonic())
    if not quiet:
        log.warning("clients kept sending while draining", extra={"event": "drain_busy"})
    streams = dataplane.end_sessions()
    log.info("open streams ended", extra={"event": "streams_ended", "streams": streams})
    await repository.drain(max(deadline - time.monotonic(), 0.0))
