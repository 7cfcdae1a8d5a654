"""gRPC codec: `inference.ModelInferRequest`/`ModelInferResponse` <-> InferenceRequest.

Uses the generated messages that ship in `tritonclient[grpc]`; no .proto is vendored here.
"""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.datatypes import (
    check_shape,
    element_count,
    numpy_dtype,
    tensor_from_bytes,
    tensor_to_bytes,
)
from server.errors import invalid, shared_memory_unsupported
from server.types import InferenceRequest, InferenceResponse, InferTensor, RequestedOutput

CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: pb.InferParameter) -> object:
    """The Python value of an `InferParameter` oneof."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def decode_request(request: pb.ModelInferRequest) -> InferenceRequest:
    """Decode raw or typed input contents into numpy arrays, checking every size."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input"
        )
    tensors = []
    for i, item in enumerate(request.inputs):
        shape = tuple(item.shape)
        check_shape(shape, item.datatype, item.name)
        if "shared_memory_region" in item.parameters:
            raise shared_memory_unsupported()
        if raw and item.HasField("contents") and item.contents.ByteSize():
            raise invalid(
                "contents field must not be specified when using raw_input_contents for "
                f"'{item.name}' for model '{request.model_name}'"
            )
        if raw:
            data = tensor_from_bytes(raw[i], item.datatype, shape)
        else:
            data = _from_contents(item, shape)
        tensors.append(InferTensor(item.name, item.datatype, shape, data))
    return InferenceRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=tensors,
        id=request.id,
        outputs=[RequestedOutput(o.name) for o in request.outputs],
        parameters={k: parameter_value(v) for k, v in request.parameters.items()},
    )


INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def set_parameter(param: pb.InferParameter, value: bool | int | float | str | None) -> None:
    """Store a Python value in the matching `InferParameter` oneof (None: left unset).

    Echoed parameters (`capture_ts`) may be any client value: an integer past the int64 range
    goes in `uint64_param`.
    """
    if value is None:
        return
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        param.int64_param = value
    elif isinstance(value, int) and 0 <= value <= UINT64_MAX:
        param.uint64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _from_contents(item: pb.ModelInferRequest.InferInputTensor, shape: tuple) -> np.ndarray:
    field = CONTENTS_FIELD.get(item.datatype)
    if field is None:
        raise invalid(f"input '{item.name}' of datatype {item.datatype} must use raw contents")
    values = getattr(item.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise invalid(
            f"input '{item.name}' has {len(values)} elements for shape {list(shape)} ({count})"
        )
    if item.datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = list(values)
        return out.reshape(shape)
    dtype = numpy_dtype(item.datatype)
    array = np.asarray(values)
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise invalid(f"values of input '{item.name}' are out of range for {item.datatype}")
    return array.astype(dtype).reshape(shape)


def encode_response(response: InferenceResponse) -> pb.ModelInferResponse:
    """Encode outputs as `raw_output_contents`, one per output, in order."""
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=response.id
    )
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(tensor_to_bytes(tensor.data))
    return message
