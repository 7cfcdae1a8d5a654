"""HTTP/2 bytes as a client puts them on the wire, for tests that talk to the gRPC server over
raw sockets (`test_grpc_transport.py`, `test_fuzz_http2_frames.py`)."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One frame: 24-bit length, type, flags, stream id, payload."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def literal_headers(pairs: list[tuple[str, str]]) -> bytes:
    """An HPACK block of literal headers without indexing (no dynamic table changes)."""
    out = b""
    for name, value in pairs:
        out += b"\x00" + bytes((len(name),)) + name.encode() + bytes((len(value),)) + value.encode()
    return out
