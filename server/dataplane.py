"""The protocol-free core of inference: look up, validate, batch, answer, count.

Both front ends call `DataPlane.infer` with an `InferenceRequest`; nothing here knows HTTP or
protobuf. A request is fully validated before it joins a queue, so a bad request fails alone.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from server import metrics
from server.config import ModelConfig
from server.errors import ErrorKind, VolleyError, invalid, unavailable
from server.repository import ModelRepository, ModelVersion
from server.runtime import onnx_strings
from server.types import InferenceRequest, InferenceResponse, InferTensor

OUTCOMES = {
    ErrorKind.INVALID_ARGUMENT: "invalid",
    ErrorKind.NOT_FOUND: "not_found",
    ErrorKind.TOO_LARGE: "invalid",
    ErrorKind.QUEUE_FULL: "queue_full",
    ErrorKind.TIMEOUT: "timeout",
    ErrorKind.UNAVAILABLE: "unavailable",
    ErrorKind.INTERNAL: "failed",
    ErrorKind.UNSUPPORTED: "invalid",
}


@lru_cache(maxsize=4096)
def _outcome_counter(model: str, version: str, protocol: str, outcome: str):
    """The labelled request counter, looked up once per label set (it is on the hot path)."""
    return metrics.REQUESTS.labels(model, version, protocol, outcome)


@lru_cache(maxsize=16)
def _inflight_gauge(protocol: str):
    return metrics.INFLIGHT.labels(protocol)


class DataPlane:
    """Server-wide state the front ends share: the repository and the draining flag."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.draining = False

    @property
    def ready(self) -> bool:
        """Ready for traffic: not draining, and every model that should serve is serving."""
        return not self.draining and self.repository.all_ready()

    async def infer(self, request: InferenceRequest, protocol: str) -> InferenceResponse:
        """Run one request through its model's batcher and count the outcome."""
        gauge = _inflight_gauge(protocol)
        gauge.inc()
        served = None
        try:
            if self.draining:
                raise unavailable("server is shutting down")
            served = self.repository.get(request.model, request.version)
            inputs, rows = validate_inputs(served.config, request)
            check_outputs(served.config, request)
            timeout_us = request_timeout_us(request.parameters)
            # No await between the lookup and the submit: a reload cannot slip in between.
            outputs = await served.batcher.infer(inputs, rows, timeout_us)
            response = build_response(served, request, outputs)
        except VolleyError as exc:
            # Label by what exists: a client must not mint series with made-up model names.
            model = request.model if request.model in self.repository.models else ""
            version = str(served.version) if served is not None else ""
            _outcome_counter(model, version, protocol, OUTCOMES[exc.kind]).inc()
            raise
        finally:
            gauge.dec()
        _outcome_counter(request.model, str(served.version), protocol, "success").inc()
        return response


def request_timeout_us(parameters: dict) -> int:
    """The `timeout` request parameter (µs), 0 when absent."""
    value = parameters.get("timeout", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"parameter 'timeout' must be a non-negative integer (µs), got {value!r}")
    return value


def validate_inputs(
    config: ModelConfig, request: InferenceRequest
) -> tuple[dict[str, np.ndarray], int]:
    """Check names, datatypes and shapes against the config; return inputs in config order."""
    given: dict[str, InferTensor] = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise invalid(f"input '{tensor.name}' is given twice")
        given[tensor.name] = tensor
    expected = {t.name for t in config.inputs}
    unknown = sorted(set(given) - expected)
    if unknown:
        raise invalid(
            f"unexpected input {unknown[0]!r} for model '{config.name}', "
            f"expected {sorted(expected)}"
        )
    rows = -1
    inputs: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise invalid(f"missing input '{spec.name}' for model '{config.name}'")
        if tensor.datatype != spec.datatype:
            raise invalid(
                f"input '{spec.name}' has datatype {tensor.datatype}, model '{config.name}' "
                f"expects {spec.datatype}"
            )
        shape = tensor.shape
        dims = shape[1:] if config.batching else shape
        wanted = ("-1",) * config.batching + tuple(str(d) for d in spec.dims)
        no_batch_dim = config.batching and not shape
        if (
            no_batch_dim
            or len(dims) != len(spec.dims)
            or any(d != s and s != -1 for d, s in zip(dims, spec.dims, strict=True))
        ):
            raise invalid(
                f"input '{spec.name}' has shape {list(shape)}, model '{config.name}' expects "
                f"[{', '.join(wanted)}]"
            )
        if config.batching:
            if not 1 <= shape[0] <= config.max_batch_size:
                raise invalid(
                    f"input '{spec.name}' has batch size {shape[0]}, model '{config.name}' "
                    f"accepts 1 to {config.max_batch_size}"
                )
            if rows not in (-1, shape[0]):
                raise invalid(f"inputs of model '{config.name}' disagree on the batch size")
            rows = shape[0]
        if spec.datatype == "BYTES":
            try:
                inputs[spec.name] = onnx_strings(tensor.data)
            except UnicodeDecodeError:
                raise invalid(f"input '{spec.name}' has BYTES elements that are not UTF-8, "
                              "which ONNX string tensors require") from None  # fmt: skip
        else:
            inputs[spec.name] = tensor.data
    return inputs, max(rows, 1)


def check_outputs(config: ModelConfig, request: InferenceRequest) -> None:
    """Every requested output must exist (checked before the request is queued)."""
    specs = {t.name for t in config.outputs}
    for output in request.outputs:
        if output.name not in specs:
            raise invalid(
                f"unknown output '{output.name}' requested from model '{config.name}', "
                f"it has {sorted(specs)}"
            )


def build_response(
    served: ModelVersion, request: InferenceRequest, outputs: dict[str, np.ndarray]
) -> InferenceResponse:
    """Pick the requested outputs (all when none are named) and describe them."""
    specs = {t.name: t for t in served.config.outputs}
    names = [o.name for o in request.outputs] or list(specs)
    tensors = []
    for name in names:
        spec = specs[name]
        value = outputs[name]
        tensors.append(InferTensor(name, spec.datatype, tuple(value.shape), value))
    return InferenceResponse(served.name, str(served.version), request.id, tensors)
