"""Exact-length reads on the stream sockets between the server and its helper processes (the
JSON decoder, the image decoders): one copy each, straight into the destination buffer.

Imports nothing heavy: the image decoder processes use it too.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from a blocking socket; EOFError if the peer closes it before."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        count = sock.recv_into(view)
        if count == 0:
            raise EOFError("the peer closed the socket")
        view = view[count:]
    return bytes(buffer)


async def receive_into(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
) -> None:
    """Fill `view` from a non-blocking socket on the event loop; EOFError if the peer closes it
    before."""
    while view:
        count = await loop.sock_recv_into(sock, view)
        if count == 0:
            raise EOFError("the helper process closed its socket")
        view = view[count:]


async def receive_exactly(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int
) -> bytearray:
    """`size` bytes from a non-blocking socket on the event loop, in a new buffer."""
    buffer = bytearray(size)
    await receive_into(loop, sock, memoryview(buffer))
    return buffer
