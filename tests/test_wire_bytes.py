"""Binary tensor data on the wire (KServe v2 / Triton): little-endian, row-major, whatever the
server's arrays look like in memory. The codecs of both protocols use these two functions."""

from __future__ import annotations

import numpy as np
import pytest

from server.datatypes import V2_TO_NUMPY, tensor_from_bytes, tensor_to_bytes
from server.errors import VolleyError

FIXED = [name for name in V2_TO_NUMPY if name != "BYTES"]


@pytest.mark.parametrize("datatype", FIXED)
def test_every_layout_encodes_to_little_endian_row_major(datatype: str) -> None:
    dtype = V2_TO_NUMPY[datatype]
    values = (np.arange(24) % 2 if datatype == "BOOL" else np.arange(24)).astype(dtype)
    wire = values.astype(dtype.newbyteorder("<")).reshape(4, 6).tobytes()
    layouts = {
        "contiguous": values.reshape(4, 6),
        "big-endian": values.astype(dtype.newbyteorder(">")).reshape(4, 6),
        "transposed view": np.ascontiguousarray(values.reshape(4, 6).T).T,
        "strided view": np.repeat(values.reshape(4, 6), 2, axis=1)[:, ::2],
        "fortran order": np.asfortranarray(values.reshape(4, 6)),
    }
    for layout, array in layouts.items():
        assert tensor_to_bytes(array) == wire, layout
    decoded = tensor_from_bytes(wire, datatype, (4, 6))
    assert decoded.dtype == dtype and np.array_equal(decoded, values.reshape(4, 6))


def test_bytes_elements_carry_length_prefixes() -> None:
    array = np.array([[b"ab", "c"], [b"", "\u00e9"]], dtype=np.object_)
    wire = tensor_to_bytes(array)
    assert wire == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9"
    decoded = tensor_from_bytes(wire, "BYTES", (2, 2))
    assert decoded.tolist() == [[b"ab", b"c"], [b"", "\u00e9".encode()]]


def test_wrong_sizes_and_unknown_datatypes_are_the_clients_error() -> None:
    with pytest.raises(VolleyError, match="expected 16 bytes"):
        tensor_from_bytes(b"\x00" * 15, "FP32", (2, 2))
    with pytest.raises(VolleyError, match="unsupported datatype 'FP8'"):
        tensor_from_bytes(b"\x00" * 4, "FP8", (4,))
