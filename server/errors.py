"""One error type for the whole server, mapped once to HTTP status codes and gRPC status codes."""

from __future__ import annotations

import logging
import secrets
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)


class ErrorKind(Enum):
    """What went wrong, as the client should see it: (HTTP status, gRPC status code name).

    The gRPC code is named, not imported: image decoder processes raise these errors too, and
    need not load grpc for it."""

    INVALID_ARGUMENT = (400, "INVALID_ARGUMENT")
    NOT_FOUND = (404, "NOT_FOUND")
    TOO_LARGE = (413, "RESOURCE_EXHAUSTED")
    QUEUE_FULL = (429, "RESOURCE_EXHAUSTED")
    # the same codes as QUEUE_FULL; the third element keeps it a distinct member
    RATE_LIMITED = (429, "RESOURCE_EXHAUSTED", "rate")
    INTERNAL = (500, "INTERNAL")
    UNSUPPORTED = (501, "UNIMPLEMENTED")
    UNAVAILABLE = (503, "UNAVAILABLE")
    TIMEOUT = (504, "DEADLINE_EXCEEDED")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        import grpc  # loaded already wherever a gRPC answer is made

        return grpc.StatusCode[self.value[1]]


class VolleyError(Exception):
    """An error with a message meant for the client and the kind that picks its status code."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple:
        # raised in the JSON decoder process, it must unpickle in the server
        return (VolleyError, (self.kind, self.message))


def raise_if_set(error: VolleyError | None) -> None:
    """Raise `error` unless it is None, and keep no reference to it in a raising frame: a
    local that holds an error its own frame raised ties the two in a reference cycle (through
    the traceback), and under overload such cycles pile up until a collector pass stalls."""
    if error is not None:
        try:
            raise error
        finally:
            del error


def invalid(message: str) -> VolleyError:
    """A client error: bad shape, dtype, JSON, parameter..."""
    return VolleyError(ErrorKind.INVALID_ARGUMENT, message)


def not_found(message: str) -> VolleyError:
    """An unknown model, version or route."""
    return VolleyError(ErrorKind.NOT_FOUND, message)


def unavailable(message: str) -> VolleyError:
    """A model or server that exists but cannot take work now."""
    return VolleyError(ErrorKind.UNAVAILABLE, message)


def shared_memory_unsupported(kind: str = "system") -> VolleyError:
    """Shared memory a client may not use: CUDA shared memory (not implemented), or system
    shared memory on a server started without --allow-client-shm."""
    instead = (
        "send tensor data in the request body (binary tensor data on HTTP, raw_input_contents "
        "on gRPC)"
    )
    if kind == "cuda":
        message = f"CUDA shared memory is not supported by Volley: {instead}"
    else:
        message = (
            "system shared memory is off in this server: start it with --allow-client-shm to "
            f"let clients on its host register regions, or {instead}"
        )
    return VolleyError(ErrorKind.UNSUPPORTED, message)


def region_already_registered(name: str) -> VolleyError:
    """A shared-memory registration under a name in use (Triton's wording). Here, not in
    `server.shm`, because the supervisor says it too and must not import numpy."""
    return invalid(f"shared memory region '{name}' already in manager")


def new_request_id() -> str:
    """A short random id that ties a client's error to the server's log entry."""
    return secrets.token_hex(6)


def internal(what: str, request_id: str) -> VolleyError:
    """A failure inside the server, told without its internals: the log has them under
    `request_id` (log them there with `extra={"request_id": request_id}`)."""
    return VolleyError(
        ErrorKind.INTERNAL, f"{what} (request id {request_id}; the server log has the details)"
    )


def unexpected(exc: Exception, **where: str) -> VolleyError:
    """Log an exception that no code path expected (a bug) under a new request id, and return
    the error its client gets: the id, never the exception's text."""
    request_id = new_request_id()
    log.error(
        "request failed",
        exc_info=exc,
        extra={"event": "unexpected_error", "request_id": request_id, **where},
    )
    return internal("internal error", request_id)
