"""HTTP/REST codec: v2 JSON and Triton's binary tensor data extension <-> InferenceRequest.

Body layout with binary data: `<JSON header><tensor bytes>...`, the JSON length given by the
`Inference-Header-Content-Length` header; tensors carrying `binary_data_size` take their bytes
from the tail in the order they appear.
"""

from __future__ import annotations

import numpy as np
import orjson

from server.classification import CLASSIFICATION, classification
from server.datatypes import (
    MAX_DIMS,
    V2_TO_NUMPY,
    check_shape,
    element_count,
    numpy_dtype,
    tensor_from_bytes,
    tensor_to_bytes,
)
from server.errors import invalid
from server.shm import shared_memory_ref
from server.types import (
    NO_DATA,
    InferenceRequest,
    InferenceResponse,
    InferTensor,
    RequestedOutput,
)

INT_ONLY = frozenset({int})
ABSENT = object()  # a member missing from a JSON object (unlike one that is null)
FLOATS = frozenset({"FP16", "FP32", "FP64"})


def decode_request(
    body: bytes, header_length: int | None, model: str, version: str
) -> InferenceRequest:
    """Parse an infer request body (JSON, or JSON plus binary tensor data)."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise invalid(
            f"Inference-Header-Content-Length {header_length} is outside the body "
            f"of {len(body)} bytes"
        )
    view = memoryview(body)
    try:
        doc = orjson.loads(body if header_length == len(body) else view[:header_length])
    except orjson.JSONDecodeError as exc:
        raise invalid(f"malformed JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid("request body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("request must have a non-empty 'inputs' list")
    binary = view[header_length:]
    offset = 0
    tensors = []
    for item in inputs:
        tensor, used = _decode_input(item, binary[offset:] if offset else binary)
        tensors.append(tensor)
        offset += used
    if offset != len(binary):
        raise invalid(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
            "binary_data_size"
        )
    request_id = doc.get("id", "")
    if type(request_id) is not str:  # orjson gives exact types
        raise invalid("id must be a string")
    parameters = doc.get("parameters", ABSENT)
    if parameters is ABSENT:
        parameters = {}
    elif type(parameters) is not dict:
        raise invalid("parameters must be a JSON object")
    outputs = doc.get("outputs", ABSENT)
    return InferenceRequest(
        model, version, tensors, request_id,
        [] if outputs is ABSENT else _decode_outputs(outputs), parameters,
    )  # fmt: skip


def _decode_input(item: object, binary: memoryview) -> tuple[InferTensor, int]:
    if not isinstance(item, dict):
        raise invalid("each input must be a JSON object")
    name, datatype = item.get("name"), item.get("datatype")
    if type(name) is not str:
        raise invalid("input name must be a string")
    if type(datatype) is not str:
        raise invalid(f"datatype of input '{name}' must be a string")
    shape = item.get("shape")
    # orjson gives exact types: a dimension of type `int` is not a boolean
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not INT_ONLY.issuperset(map(type, shape))
        or (shape and min(shape) < 0)
    ):
        raise invalid(f"shape of input '{name}' must be a list of non-negative integers")
    shape = tuple(shape)
    check_shape(shape, datatype, name)
    parameters = item.get("parameters")
    if parameters is not None:
        placed = _placed_input(item, name, datatype, shape, parameters, binary)
        if placed is not None:
            return placed
    if "data" not in item:
        raise invalid(f"input '{name}' has neither 'data' nor binary_data_size")
    return InferTensor(name, datatype, shape, _from_json(item["data"], datatype, shape, name)), 0


def _placed_input(
    item: dict,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    parameters: object,
    binary: memoryview,
) -> tuple[InferTensor, int] | None:
    """An input whose parameters place it in binary data or shared memory, and the bytes of
    binary data it takes; None for an input whose data is in the JSON."""
    if not isinstance(parameters, dict):
        raise invalid(f"parameters of input '{name}' must be a JSON object")
    size = parameters.get("binary_data_size")
    shared = shared_memory_ref(parameters, "input", name)
    if shared is not None:
        if "data" in item or size is not None:
            raise invalid(f"input '{name}' lies in shared memory: it takes no data")
        return InferTensor(name, datatype, shape, NO_DATA, shared), 0
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid(f"binary_data_size of input '{name}' must be a non-negative integer")
    if size > len(binary):
        raise invalid(
            f"input '{name}' claims {size} bytes of binary data, only {len(binary)} remain"
        )
    if "data" in item:
        raise invalid(f"input '{name}' has both 'data' and binary_data_size")
    try:
        data = tensor_from_bytes(binary[:size], datatype, shape)
    except ValueError as exc:
        raise invalid(f"input '{name}': {exc}") from None
    return InferTensor(name, datatype, shape, data), size


def _from_json(data: object, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = element_count(shape)
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=np.object_).reshape(-1)
            if flat.size != count:
                raise ValueError(f"{flat.size} elements for shape {list(shape)}")
            out = np.empty(count, dtype=np.object_)
            out[:] = [x.encode() if isinstance(x, str) else _bytes_item(x) for x in flat]
            return out.reshape(shape)
        array = np.asarray(data)
        if array.dtype.kind == "f" and datatype in FLOATS:  # the common case, in short
            if array.size != count:
                raise ValueError(f"{array.size} elements for shape {list(shape)}")
            return array.astype(V2_TO_NUMPY[datatype], copy=False).reshape(shape)
        if datatype == "UINT64" and array.dtype.kind == "f":
            array = _exact_uint64(data, array)
        if array.dtype.kind not in "biuf" or (datatype == "BOOL") != (array.dtype.kind == "b"):
            raise ValueError(f"values are not of datatype {datatype}")
        if array.size != count:
            raise ValueError(f"{array.size} elements for shape {list(shape)}")
        dtype = numpy_dtype(datatype)
        if dtype.kind in "iu" and array.size:
            if array.dtype.kind == "f":
                raise ValueError(f"non-integer values for datatype {datatype}")
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"values out of range for datatype {datatype}")
        return array.astype(dtype, copy=False).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise invalid(
            f"data of input '{name}' does not match its shape or datatype: {exc}"
        ) from None


def _exact_uint64(data: list, array: np.ndarray) -> np.ndarray:
    """numpy reads integers below and above 2**63 together as float64, losing digits: UINT64
    data of plain integers is read exactly instead (anything else is left to the checks)."""
    items = np.asarray(data, dtype=np.object_).reshape(-1).tolist()
    if not all(type(x) is int for x in items):
        return array
    return np.array(items, dtype=np.uint64).reshape(array.shape)


def _bytes_item(value: object) -> bytes:
    raise ValueError(f"BYTES elements must be strings, got {type(value).__name__}")


def _decode_outputs(outputs: object) -> list[RequestedOutput]:
    if not isinstance(outputs, list):
        raise invalid("'outputs' must be a list")
    requested = []
    for item in outputs:
        if not isinstance(item, dict):
            raise invalid("each requested output must be a JSON object")
        name = item.get("name")
        if type(name) is not str:  # orjson gives exact types
            raise invalid("output name must be a string")
        params = item.get("parameters", ABSENT)
        if params is ABSENT:
            requested.append(RequestedOutput(name))
            continue
        if type(params) is not dict:
            raise invalid(f"parameters of output '{name}' must be a JSON object")
        binary = params.get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise invalid(f"binary_data of output '{name}' must be true or false")
        shared = shared_memory_ref(params, "output", name)
        classes = classification(params[CLASSIFICATION], name) if CLASSIFICATION in params else 0
        requested.append(RequestedOutput(name, binary, shared, classes))
    return requested


def encode_response(
    response: InferenceResponse, request: InferenceRequest
) -> tuple[bytes, int | None]:
    """Serialise a response; returns the body and the JSON header length if binary data follows."""
    default_binary = request.parameters.get("binary_data_output", False) is True
    wants = {o.name: o.binary for o in request.outputs} if request.outputs else {}
    blobs: list[bytes] = []
    outputs = []
    for tensor in response.outputs:
        binary = wants.get(tensor.name)
        if binary is None:
            binary = default_binary
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.shared_memory is not None:
            # Written to the client's region: no data, and no parameters (Triton's C++ client
            # takes an output with parameters to carry binary data).
            pass
        elif binary:
            blob = tensor_to_bytes(tensor.data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [_text(x) for x in tensor.data.reshape(-1)]
        else:
            entry["data"] = tensor.data.ravel()  # a view when contiguous: orjson needs that
        outputs.append(entry)
    doc: dict = {"model_name": response.model, "model_version": response.version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _text(item: object) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    return str(item)
