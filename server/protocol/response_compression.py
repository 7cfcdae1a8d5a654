"""Compressed infer answers for clients that ask (`Accept-Encoding: gzip` or `deflate`), as
Triton does and tritonclient's `response_compression_algorithm` asks.

Only answers of at least MIN_BYTES are compressed: below that, the headers cost more than the
bytes saved (a one-row fraud answer is 190 bytes). Answers past INLINE_BYTES are compressed on
a thread (zlib lets the GIL go), so a large one never holds the event loop. `deflate` is the
zlib format, as tritonclient and browsers read it. The binary extension's
`Inference-Header-Content-Length` still counts the JSON part of the uncompressed body.
"""

from __future__ import annotations

import asyncio
import zlib

MIN_BYTES = 1024
INLINE_BYTES = 64 * 1024
LEVEL = 1  # fast: a server compresses every answer; most of the saving comes at level 1
ENCODINGS = (b"gzip", b"deflate")  # in the order this server prefers them


def chosen_encoding(accept_encoding: bytes | None) -> bytes | None:
    """The encoding to answer in from an `Accept-Encoding` value (`gzip, deflate;q=0.5`):
    gzip or deflate if the client accepts it (q > 0), else None (identity)."""
    if not accept_encoding:
        return None
    accepted = set()
    for item in accept_encoding.lower().split(b","):
        name, _, params = item.partition(b";")
        quality = 1.0
        params = params.strip()
        if params.startswith(b"q="):
            try:
                quality = float(params[2:])
            except ValueError:
                quality = 0.0
        if quality > 0:
            accepted.add(name.strip())
    for encoding in ENCODINGS:
        if encoding in accepted:
            return encoding
    return None


async def compressed(body: bytes, encoding: bytes) -> bytes:
    """`body` in `encoding` (gzip or deflate)."""
    if len(body) <= INLINE_BYTES:
        return _compress(body, encoding)
    return await asyncio.to_thread(_compress, body, encoding)


def window_bits(encoding: bytes) -> int:
    """zlib's window argument for an HTTP content coding: gzip framing, or zlib's (deflate)."""
    return 16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS


def _compress(body: bytes, encoding: bytes) -> bytes:
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, window_bits(encoding))
    return compressor.compress(body) + compressor.flush()
