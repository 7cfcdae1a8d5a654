"""KServe v2 datatypes: mapping to numpy and the BYTES wire encoding (4-byte length prefixes)."""

from __future__ import annotations

import math
import struct
import sys

import numpy as np

from server.errors import invalid

V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NATIVE_IS_WIRE_ORDER = sys.byteorder == "little"
# The wire's byte order (little-endian) of each fixed-size datatype, made once.
WIRE_DTYPES: dict[str, np.dtype] = {
    name: dtype.newbyteorder("<") for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"
}

ONNX_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name; a 400 for names Volley does not serve."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise invalid(f"unsupported datatype '{datatype}'") from None


MAX_DIMS = 32
# numpy refuses a shape whose non-zero dimensions span more bytes than it can index, even when
# another dimension is 0; such shapes are refused as the client's mistake, before numpy sees them.
MAX_SPAN_BYTES = np.iinfo(np.intp).max


def check_shape(shape: tuple[int, ...], datatype: str, name: str) -> None:
    """A 400 for a shape no tensor can have: too many or negative dimensions, or too large."""
    if len(shape) > MAX_DIMS:
        raise invalid(f"input '{name}' has {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise invalid(f"shape of input '{name}' must be non-negative, got {list(shape)}")
    dims = shape if 0 not in shape else [max(dim, 1) for dim in shape]  # a 0 hides no huge dim
    if numpy_dtype(datatype).itemsize * math.prod(dims) > MAX_SPAN_BYTES:
        raise invalid(f"shape {list(shape)} of input '{name}' is too large for any tensor")


def element_count(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of this shape."""
    return math.prod(shape)


def tensor_from_bytes(raw: bytes | memoryview, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode little-endian row-major wire bytes into an array, checking the size exactly."""
    count = element_count(shape)
    if datatype == "BYTES":
        return _bytes_from_wire(raw, count).reshape(shape)
    dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        numpy_dtype(datatype)  # raises the 400 for a datatype Volley does not serve
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"expected {expected} bytes for a {datatype} tensor of shape {list(shape)}, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_to_bytes(array: np.ndarray) -> bytes:
    """Encode an array as v2 wire bytes (BYTES elements get 4-byte length prefixes)."""
    dtype = array.dtype
    if dtype.kind in "OSU":
        return _bytes_to_wire(array)
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not NATIVE_IS_WIRE_ORDER):
        array = array.astype(dtype.newbyteorder("<"))
    return array.tobytes()  # row-major whatever the array's layout


def _bytes_from_wire(raw: bytes | memoryview, count: int) -> np.ndarray:
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise invalid("truncated BYTES element length")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise invalid("BYTES element runs past the end of its tensor data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise invalid(f"expected {count} BYTES elements, got {len(items)}")
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out


def _bytes_to_wire(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)
