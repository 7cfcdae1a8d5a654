"""HTTP/2 bytes as a client puts them on the wire, for tests that talk to the gRPC server over
raw sockets (`test_grpc_transport.py`, `test_fuzz_http2_frames.py`)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

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


def frames_in(data: bytes, start: int = 0) -> Iterator[tuple[int, int, bytes, int]]:
    """The whole frames in `data` from offset `start`: (type, stream id, payload, the offset
    after the frame); a frame not all there yet ends the iteration."""
    at = start
    while at + 9 <= len(data):
        end = at + 9 + int.from_bytes(data[at : at + 3], "big")
        if end > len(data):
            return
        stream = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        yield data[at + 3], stream, data[at + 9 : end], end
        at = end
