"""The protocol-free request and response that both front ends translate to and from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from server.tracing import Trace

NO_DATA = np.empty(0, dtype=np.uint8)  # the data of a tensor that lies in shared memory


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a tensor lies in a client's registered shared-memory region (`server.shm`)."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True)
class InferTensor:
    """A named tensor with the datatype and shape the client declared. A request's input named
    by `shared_memory` has no data until the data plane reads it; a response's output with one
    was written there and carries no data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    shared_memory: SharedMemoryRef | None = None


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; `binary` is the HTTP binary-data choice (None: default),
    `shared_memory` where to put it instead of the response, `classification` how many of its
    top classes to answer with instead of its values (0: its values)."""

    name: str
    binary: bool | None = None
    shared_memory: SharedMemoryRef | None = None
    classification: int = 0  # answer its top k classes instead (`server.classification`)


@dataclass(slots=True)
class InferenceRequest:
    """One inference request, decoded from HTTP JSON, HTTP binary or gRPC."""

    model: str
    version: str
    inputs: list[InferTensor]
    id: str = ""
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    trace: Trace | None = None  # set when the request is traced (`server.tracing`)

    @property
    def shared_memory(self) -> bool:
        """Whether some input or output names a shared-memory region."""
        for tensor in self.inputs:  # loops: cheaper than any() over a generator, per request
            if tensor.shared_memory is not None:
                return True
        for output in self.outputs:  # noqa: SIM110 - see above
            if output.shared_memory is not None:
                return True
        return False


@dataclass(slots=True)
class InferenceResponse:
    """The answer to one request: its own rows of every requested output."""

    model: str
    version: str
    id: str
    outputs: list[InferTensor]
    parameters: dict[str, bool | int | float | str] = field(default_factory=dict)
