"""One error type for the whole server, mapped once to HTTP status codes and gRPC status codes."""

from __future__ import annotations

from enum import Enum

import grpc


class ErrorKind(Enum):
    """What went wrong, as the client should see it: (HTTP status, gRPC status code)."""

    INVALID_ARGUMENT = (400, grpc.StatusCode.INVALID_ARGUMENT)
    NOT_FOUND = (404, grpc.StatusCode.NOT_FOUND)
    TOO_LARGE = (413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    QUEUE_FULL = (429, grpc.StatusCode.RESOURCE_EXHAUSTED)
    INTERNAL = (500, grpc.StatusCode.INTERNAL)
    UNSUPPORTED = (501, grpc.StatusCode.UNIMPLEMENTED)
    UNAVAILABLE = (503, grpc.StatusCode.UNAVAILABLE)
    TIMEOUT = (504, grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[1]


class VolleyError(Exception):
    """An error with a message meant for the client and the kind that picks its status code."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def invalid(message: str) -> VolleyError:
    """A client error: bad shape, dtype, JSON, parameter..."""
    return VolleyError(ErrorKind.INVALID_ARGUMENT, message)


def not_found(message: str) -> VolleyError:
    """An unknown model, version or route."""
    return VolleyError(ErrorKind.NOT_FOUND, message)


def unavailable(message: str) -> VolleyError:
    """A model or server that exists but cannot take work now."""
    return VolleyError(ErrorKind.UNAVAILABLE, message)


def shared_memory_unsupported() -> VolleyError:
    """Triton's shared-memory extensions are not implemented: say so plainly."""
    return VolleyError(
        ErrorKind.UNSUPPORTED,
        "shared memory is not supported by Volley: send tensor data in the request body "
        "(binary tensor data on HTTP, raw_input_contents on gRPC)",
    )
