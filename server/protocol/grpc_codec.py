"""gRPC codec: `inference.ModelInferRequest`/`ModelInferResponse` <-> InferenceRequest.

Uses the generated messages that ship in `tritonclient[grpc]`; no .proto is vendored here.
"""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.classification import CLASSIFICATION, classification
from server.datatypes import (
    check_shape,
    element_count,
    numpy_dtype,
    tensor_from_bytes,
    tensor_to_bytes,
)
from server.errors import VolleyError, invalid
from server.shm import NAME_PARAMETER, OFFSET_PARAMETER, SIZE_PARAMETER, shared_memory_ref
from server.types import (
    NO_DATA,
    InferenceRequest,
    InferenceResponse,
    InferTensor,
    RequestedOutput,
    SharedMemoryRef,
)

HEADS_KEPT = 256  # serialized response heads kept (`encode_response_bytes`)
_heads: dict[tuple, bytes] = {}

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
        in_request = sum(NAME_PARAMETER not in i.parameters for i in request.inputs)
        if len(raw) != in_request:
            raise _raw_count_error(len(raw), in_request)
    tensors = []
    raw_index = 0
    for item in request.inputs:
        # Each read of a protobuf field makes a new Python object: read each once.
        name, datatype, shape = item.name, item.datatype, tuple(item.shape)
        check_shape(shape, datatype, name)
        shared = _shared_memory(item.parameters, "input", name)
        if (shared is not None or raw) and item.HasField("contents") and item.contents.ByteSize():
            if shared is not None:
                raise invalid(f"input '{name}' lies in shared memory: it takes no contents")
            raise invalid(
                "contents field must not be specified when using raw_input_contents for "
                f"'{name}' for model '{request.model_name}'"
            )
        if shared is not None:
            tensors.append(InferTensor(name, datatype, shape, NO_DATA, shared))
            continue
        if raw:
            data = tensor_from_bytes(raw[raw_index], datatype, shape)
            raw_index += 1
        else:
            data = _from_contents(item, shape)
        tensors.append(InferTensor(name, datatype, shape, data))
    if raw_index != len(raw):  # as many as inputs, but some of those are in shared memory
        raise _raw_count_error(len(raw), raw_index)
    outputs = []
    for output in request.outputs:
        name = output.name
        parameters = output.parameters
        shared = _shared_memory(parameters, "output", name)
        classes = 0
        if CLASSIFICATION in parameters:
            classes = classification(parameter_value(parameters[CLASSIFICATION]), name)
        outputs.append(RequestedOutput(name, None, shared, classes))
    parameters = request.parameters
    return InferenceRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=tensors,
        id=request.id,
        outputs=outputs,
        parameters={k: parameter_value(v) for k, v in parameters.items()} if parameters else {},
    )


def _raw_count_error(raw: int, in_request: int) -> VolleyError:
    return invalid(
        f"{raw} raw_input_contents for {in_request} inputs: give one per input "
        "(none for an input in shared memory)"
    )


def _shared_memory(parameters, kind: str, name: str) -> SharedMemoryRef | None:
    if NAME_PARAMETER not in parameters:
        return None
    return shared_memory_ref({k: parameter_value(v) for k, v in parameters.items()}, kind, name)


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
    message = _described(response)
    message.id = response.id
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    for tensor, output in zip(response.outputs, message.outputs, strict=True):
        if tensor.shared_memory is None:
            message.raw_output_contents.append(tensor_to_bytes(tensor.data))
            continue
        # Written to shared memory: an empty entry keeps raw_output_contents one per output.
        message.raw_output_contents.append(b"")
        output.parameters[NAME_PARAMETER].string_param = tensor.shared_memory.region
        output.parameters[SIZE_PARAMETER].int64_param = tensor.shared_memory.byte_size
        if tensor.shared_memory.offset:
            output.parameters[OFFSET_PARAMETER].int64_param = tensor.shared_memory.offset
    return message


def _described(response: InferenceResponse) -> pb.ModelInferResponse:
    """A response naming the model and version and describing each output (name, datatype,
    shape), without contents."""
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version)
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    return message


def encode_response_bytes(response: InferenceResponse) -> bytes:
    """`encode_response`, serialized: the unary answer's bytes.

    The head of an answer (`_described`) is the same for every answer of the same shapes, so
    it is serialized once and kept (up to HEADS_KEPT of them); the rest (id, raw contents) is
    serialized on its own and appended. Protobuf reads concatenated messages as one merged
    message, and the two parts set different fields.
    """
    outputs = response.outputs
    for tensor in outputs:
        if tensor.shared_memory is not None:  # its parameters are set per request
            return encode_response(response).SerializeToString()
    if response.parameters:
        return encode_response(response).SerializeToString()
    key = (response.model, response.version, *[(t.name, t.datatype, t.shape) for t in outputs])
    head = _heads.get(key)
    if head is None:
        head = _described(response).SerializeToString()
        if len(_heads) >= HEADS_KEPT:
            _heads.clear()
        _heads[key] = head
    rest = pb.ModelInferResponse(
        id=response.id, raw_output_contents=[tensor_to_bytes(t.data) for t in outputs]
    )
    return head + rest.SerializeToString()
