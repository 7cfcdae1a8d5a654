"""The protocol-free request and response that both front ends translate to and from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class InferTensor:
    """A named tensor with the datatype and shape the client declared."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class RequestedOutput:
    """An output the client asked for; `binary` is the HTTP binary-data choice (None: default)."""

    name: str
    binary: bool | None = None


@dataclass
class InferenceRequest:
    """One inference request, decoded from HTTP JSON, HTTP binary or gRPC."""

    model: str
    version: str
    inputs: list[InferTensor]
    id: str = ""
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)


@dataclass
class InferenceResponse:
    """The answer to one request: its own rows of every requested output."""

    model: str
    version: str
    id: str
    outputs: list[InferTensor]
    parameters: dict[str, bool | int | float | str] = field(default_factory=dict)
