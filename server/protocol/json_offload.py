"""Large JSON infer bodies are decoded in a worker process, never on the event loop.

Decoding JSON tensor data costs about 15 ms per MB (orjson, then numpy), and both hold the GIL:
in a thread it would stall the event loop just the same, and with it every HTTP and gRPC call
of the server. Bodies whose JSON part is under `OFFLOAD_BYTES` (about 2 ms of work) are decoded
inline; larger ones go to one worker process, at most `slots` at a time: past that a client is
told to retry (429) before its body is even read, so memory stays bounded too.

The body travels to the worker over a local socket chunk by chunk, as it arrives from the
client, and the decoded tensors come back as raw buffers received straight into their arrays:
no multi-megabyte copy is made with the GIL held (a 12 MB body took 7 ms to join and 6 ms to
pickle on the development VM, long enough to show in every other request's p99).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import secrets
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from server.child_process import die_with_parent
from server.errors import ErrorKind, VolleyError, unexpected
from server.protocol import http_codec
from server.sockets import read_exactly, receive_exactly
from server.types import InferenceRequest

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 128 * 1024
# The decoder runs at a lower priority than the server: a flood of large JSON bodies must not
# take the CPU that every other request needs.
WORKER_NICENESS = 10
START_SECONDS = 30.0

_JOB = struct.Struct("<qII")  # header length (-1: none), model name bytes, version bytes
_SIZE = struct.Struct("<Q")
_COUNT = struct.Struct("<I")


class JsonOffload:
    """The decoder process (started at the first large body) and its bounded slots."""

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._busy = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._address = ""

    def reserve(self) -> None:
        """Take a slot for one large body, or refuse with 429 when all are taken."""
        if self._busy >= self.slots:
            raise VolleyError(
                ErrorKind.QUEUE_FULL,
                f"{self.slots} large JSON bodies are being decoded already; retry later, or "
                "send tensors as binary data (Triton's binary tensor extension), which needs "
                "no decoding",
            )
        self._busy += 1

    def release(self) -> None:
        """Give back a slot taken with `reserve`."""
        self._busy -= 1

    async def decode(
        self, chunks: AsyncIterator[bytes], header_length: int | None, model: str, version: str
    ) -> InferenceRequest:
        """`http_codec.decode_request` of the body `chunks` make up, in the decoder process
        (the caller holds a slot). An error reading the body stops the job and propagates."""
        loop = asyncio.get_running_loop()
        sock = await self._connect(loop)
        try:
            names = model.encode(), version.encode()
            job = _JOB.pack(-1 if header_length is None else header_length, *map(len, names))
            await loop.sock_sendall(sock, job + b"".join(names))
            async for chunk in chunks:
                if chunk:
                    await loop.sock_sendall(sock, _SIZE.pack(len(chunk)))
                    await loop.sock_sendall(sock, chunk)
            await loop.sock_sendall(sock, _SIZE.pack(0))
            result = await _receive_result(loop, sock)
        except (ConnectionError, EOFError, pickle.UnpicklingError):
            log.error("JSON decoder process failed", extra={"event": "json_offload_broken"})
            raise VolleyError(
                ErrorKind.INTERNAL, "the JSON decoder process failed; see the server log"
            ) from None
        finally:
            sock.close()
        if isinstance(result, VolleyError):
            raise result
        return result

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        if self._process is None or not self._process.is_alive():
            self._start()
        deadline = time.monotonic() + START_SECONDS
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self._address)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline or not self._process.is_alive():
                    raise VolleyError(
                        ErrorKind.INTERNAL, "the JSON decoder process did not start"
                    ) from None
                await asyncio.sleep(0.02)

    def _start(self) -> None:
        if sys.platform.startswith("linux"):  # abstract socket: no file, read-only root is fine
            self._address = f"\0volley-json-{os.getpid()}-{secrets.token_hex(4)}"
        else:
            self._address = str(Path(tempfile.mkdtemp(prefix="volley-")) / "json.sock")
        # spawn, not fork: the server process runs threads (batchers, gRPC core)
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=serve_decoder,
            args=(self._address, os.getpid()),
            name="volley-json",
            daemon=True,
        )
        self._process.start()

    def close(self) -> None:
        """Stop the decoder process, if one was started."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._process = None


async def _receive_result(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> object:
    """A pickle and its out-of-band buffers, each received straight into its own memory."""
    (size,) = _SIZE.unpack(await receive_exactly(loop, sock, _SIZE.size))
    data = await receive_exactly(loop, sock, size)
    (count,) = _COUNT.unpack(await receive_exactly(loop, sock, _COUNT.size))
    buffers = []
    for _ in range(count):
        (length,) = _SIZE.unpack(await receive_exactly(loop, sock, _SIZE.size))
        buffers.append(await receive_exactly(loop, sock, length))
    return pickle.loads(data, buffers=buffers)


# --- the decoder process -------------------------------------------------------------------


def serve_decoder(address: str, server_pid: int) -> None:
    """The decoder process: one job per connection, one at a time, until it is terminated or
    the server process is gone (even SIGKILLed: no decoder outlives its server)."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != server_pid:
        return  # the server died before the line above
    os.nice(WORKER_NICENESS)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                _serve_job(connection)
            except (ConnectionError, EOFError):
                continue  # the server gave up on this body (client gone, body too large)


def _serve_job(connection: socket.socket) -> None:
    header_length, model_size, version_size = _JOB.unpack(read_exactly(connection, _JOB.size))
    model = read_exactly(connection, model_size).decode()
    version = read_exactly(connection, version_size).decode()
    body = bytearray()
    while size := _SIZE.unpack(read_exactly(connection, _SIZE.size))[0]:
        body += read_exactly(connection, size)
    try:
        result: object = http_codec.decode_request(
            body, None if header_length < 0 else header_length, model, version
        )
    except VolleyError as exc:
        result = exc
    except Exception as exc:  # a bug: the client gets a request id, stderr the details
        result = unexpected(exc, model=model)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
    connection.sendall(_SIZE.pack(len(data)) + data + _COUNT.pack(len(buffers)))
    for buffer in buffers:
        raw = buffer.raw()
        connection.sendall(_SIZE.pack(raw.nbytes))
        connection.sendall(raw)
