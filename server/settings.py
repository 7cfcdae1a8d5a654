"""What `volley serve` was asked to do, and the checks made before anything starts.

Kept apart from `server.app` so that a `--workers N` supervisor, which only starts and watches
worker processes, never imports the front ends, ONNX Runtime or the models.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.auth import ApiKeys, KeyFileError
from server.tracing import TraceValues

if TYPE_CHECKING:
    from server.tls import TlsFiles


@dataclass(frozen=True)
class ServeSettings:
    """What `volley serve` was asked to do."""

    model_repository: Path = Path("models")
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control: str = "explicit"  # Triton's modes: none, poll, explicit
    load_models: tuple[str, ...] = ("*",)  # explicit mode: loaded at start ("*": every model)
    strict_readiness: bool = True
    poll_seconds: float = 0.0
    max_request_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 16 * 1024 * 1024
    api_keys: Path | None = None  # a key file: every call but liveness then needs a key
    cors_origins: tuple[str, ...] = ()  # browser pages of these origins may call the HTTP API
    tls: TlsFiles | None = None
    metrics_tls: bool = False  # the metrics port behind the same TLS (else plain)
    rate_limit: float = 0.0  # inference requests a second per client address (0: no limit)
    rate_burst: float = 0.0  # bucket size (0: one second's worth)
    shutdown_timeout: float = 30.0
    http_keepalive_timeout: float = 30.0  # an idle HTTP connection closes after this
    workers: int = 1  # server processes under a supervisor (server/supervisor.py; the CLI: auto)
    allow_client_shm: bool = False  # clients may register system shared memory (server/shm.py)
    busy_poll_us: int = 300  # the loop polls up to this long after going idle (server/busy_poll.py)
    busy_poll_always: bool = False  # after every answer, not only while requests come close
    switch_interval_ms: float | None = None  # the GIL switch interval (None: Python's, 5 ms)
    trace: TraceValues = TraceValues()  # the trace settings at start (`--trace-config`)
    trace_file: str = ""  # where traces are written ("": tracing cannot be turned on)


class StartupError(Exception):
    """A reason not to start, said in one line (the CLI prints it and exits non-zero)."""


def address_family(host: str) -> socket.AddressFamily:
    """The socket family to bind `host` with: IPv6 for an IPv6 address ("::", "::1")."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_startup(settings: ServeSettings) -> None:
    """Refuse to start on a missing repository, unusable key or TLS files, or a port another
    process holds."""
    if settings.api_keys is not None:
        try:
            ApiKeys.load(settings.api_keys)
        except KeyFileError as exc:
            raise StartupError(str(exc)) from None
    if settings.tls is not None:
        try:
            settings.tls.check()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    elif settings.metrics_tls:
        raise StartupError("--metrics-tls needs --tls-cert and --tls-key")
    if not settings.model_repository.is_dir():
        raise StartupError(
            f"model repository '{settings.model_repository}' does not exist "
            "(set it with --model-repository)"
        )
    ports = [("--http-port", settings.http_port), ("--grpc-port", settings.grpc_port)]
    if settings.metrics_port:
        ports.append(("--metrics-port", settings.metrics_port))
    for flag, port in ports:
        with socket.socket(address_family(settings.host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
            try:
                probe.bind((settings.host, port))
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {settings.host}:{port} ({exc.strerror}): another process "
                    f"may hold it; choose another port with {flag}"
                ) from None
