"""Exceptions of the Volley SDK: the server's message and status, one class per kind of failure."""

from __future__ import annotations


class VolleyError(Exception):
    """A call failed. `message` is the server's text (or the transport's); `status` its code as
    the protocol gave it: "404" over HTTP, "NOT_FOUND" over gRPC, "" when there was none."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"[{self.status}] {self.message}" if self.status else self.message


class ModelNotFound(VolleyError):
    """Unknown model or version (404 / NOT_FOUND)."""


class InvalidInput(VolleyError):
    """The server rejected the request's inputs or parameters (400 / INVALID_ARGUMENT)."""


class Unavailable(VolleyError):
    """Server unreachable, not ready or draining (503 / UNAVAILABLE, connection refused)."""


class Overloaded(VolleyError):
    """The model's queue is full (429 / RESOURCE_EXHAUSTED): slow down."""


class DeadlineExceeded(VolleyError):
    """No answer within the timeout, the client's or the server's (504 / DEADLINE_EXCEEDED)."""


_KINDS: dict[str, type[VolleyError]] = {
    "400": InvalidInput,
    "INVALID_ARGUMENT": InvalidInput,
    "404": ModelNotFound,
    "NOT_FOUND": ModelNotFound,
    "429": Overloaded,
    "RESOURCE_EXHAUSTED": Overloaded,
    "503": Unavailable,
    "UNAVAILABLE": Unavailable,
    "504": DeadlineExceeded,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def error(message: str, status: str) -> VolleyError:
    """The VolleyError subclass for a status ("404", "StatusCode.NOT_FOUND", "NOT_FOUND", ...)."""
    status = status.removeprefix("StatusCode.")
    return _KINDS.get(status, VolleyError)(message, status)


def to_error(exc: BaseException, url: str) -> VolleyError | None:
    """The VolleyError for a tritonclient, gRPC or socket exception; None for anything else."""
    from http.client import HTTPException

    from grpc import RpcError
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, VolleyError):
        return exc
    if isinstance(exc, InferenceServerException):
        return error(str(exc.message() or type(exc).__name__), str(exc.status() or ""))
    if isinstance(exc, RpcError) and callable(getattr(exc, "code", None)):
        return error(str(exc.details()), exc.code().name)  # grpc.aio calls raise these
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"no answer from {url} in time", "DEADLINE_EXCEEDED")
    if isinstance(exc, OSError):
        return Unavailable(f"cannot reach {url}: {exc.strerror or exc}", "UNAVAILABLE")
    if isinstance(exc, HTTPException):  # the HTTP client's parser: the connection broke mid-answer
        return Unavailable(f"connection to {url} broke during the answer: {exc}", "UNAVAILABLE")
    return None
