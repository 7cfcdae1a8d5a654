"""Decoder processes: a pipeline's encoded images checked, decoded and letterboxed outside the
server process (`decode_processes: N` in the pipeline's config).

By default a pipeline decodes on its thread pool. OpenCV releases the GIL while it decodes, but
each image still takes and gives back the GIL several times, and on a machine with many cores
and one GPU, where one server process feeds the detector (one CUDA context, full batches), every
such hand-over makes the detector's batch thread and the event loop wait their turn. With
decoder processes no thread is involved at all: the event loop writes the encoded bytes to a
decoder over a socket pair and receives the letterboxed uint8 pixels straight into their array.

A decoder that dies (killed, out of memory, an image that crashes a codec) or does not answer
within `decode_timeout_ms` (a codec stuck on an image; the decoder is killed) fails the image it
had with a clean 500 and is replaced: at once while deaths are rare, else one a second, so that
a client sending images that crash a codec cannot make the server spend its CPU starting
processes (requests wait for a decoder meanwhile). A decoder that cannot be started (out of
processes or memory) is retried once a second the same way. A job whose
caller left finishes anyway and gives its decoder back. Decoders exit with their server: their
socket closes, and on Linux the kernel also sends them SIGKILL when the server process dies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time

import numpy as np

from server import metrics
from server.errors import ErrorKind, VolleyError, internal, new_request_id
from server.pipelines.decoder_process import ANSWER, INVALID, JOB, OK
from server.pipelines.images import Letterboxed
from server.sockets import receive_exactly, receive_into

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024  # a 640x640 answer fits in one go
# Past as many deaths as the pool has decoders within this window, replacements are paced.
RESPAWN_WINDOW_S = 10.0
RESPAWN_DELAY_S = 1.0


class DecoderPool:
    """`count` decoder processes, each doing one job at a time, shared by a pipeline's requests."""

    def __init__(self, count: int, name: str, timeout_s: float = 10.0) -> None:
        self.name = name
        self._count = count
        self._timeout_s = timeout_s
        self._idle: asyncio.Queue[_Decoder] = asyncio.Queue()
        self._decoders: set[_Decoder] = set()
        self._closed = False
        self._deaths: list[float] = []  # monotonic times, within the last RESPAWN_WINDOW_S
        self._owed = 0  # decoders to start once the pace allows
        self._respawn: asyncio.TimerHandle | None = None
        for _ in range(count):
            self._add()

    async def letterbox(
        self, data: bytes, what: str, height: int, width: int, pad: int, max_pixels: int
    ) -> Letterboxed:
        """`decode_image` then `letterbox` of one encoded image, in a decoder process: the same
        checks, the same errors (400 for a bad image) and the same pixels as on a thread."""
        decoder = None if self._closed else await self._idle.get()
        if decoder is None or self._closed:
            raise self._unloading()
        job = asyncio.ensure_future(self._job(decoder, data, what, height, width, pad, max_pixels))
        job.add_done_callback(_retrieve)
        # A caller that leaves (client gone, deadline) does not stop the decoder mid-job: the
        # job finishes on its own and gives the decoder back, rather than a process per leaver.
        # (Cancelling the job itself would also be wrong before it starts: a task cancelled
        # before its first step never runs, and its decoder would be lost to the pool.)
        return await asyncio.shield(job)

    async def _job(
        self,
        decoder: _Decoder,
        data: bytes,
        what: str,
        height: int,
        width: int,
        pad: int,
        max_pixels: int,
    ) -> Letterboxed:
        try:
            boxed = await asyncio.wait_for(
                decoder.run(data, what, height, width, pad, max_pixels), self._timeout_s
            )
        except VolleyError:
            self._idle.put_nowait(decoder)  # a bad image: the decoder is fine
            raise
        except (OSError, EOFError, TimeoutError) as exc:  # the decoder died, or is stuck
            self._replace(decoder)
            if self._closed:
                raise self._unloading() from None
            metrics.DECODER_FAILURES.labels(self.name).inc()
            request_id = new_request_id()
            stuck = isinstance(exc, TimeoutError)
            log.warning(
                "a decoder process failed and was replaced",
                extra={"event": "decoder_failed", "model": self.name, "request_id": request_id,
                       "reason": f"no answer in {self._timeout_s:g} s" if stuck else str(exc)},
            )  # fmt: skip
            replaced = f"not decoded within {self._timeout_s:g} s; its decoder process was replaced"
            message = f"{what}: {replaced}" if stuck else f"{what}: the decoder process failed"
            raise internal(message, request_id) from None
        except BaseException:
            self._replace(decoder)
            raise
        self._idle.put_nowait(decoder)
        return boxed

    def close(self) -> None:
        """Stop every decoder (jobs in progress fail)."""
        self._closed = True
        if self._respawn is not None:
            self._respawn.cancel()
        for decoder in list(self._decoders):
            self._retire(decoder)

    def _unloading(self) -> VolleyError:
        return VolleyError(ErrorKind.UNAVAILABLE, f"model '{self.name}' is unloading")

    def _add(self) -> None:
        if self._closed:
            return
        try:
            decoder = _Decoder.start()
        except OSError as exc:
            log.error(
                "a decoder process could not be started; retrying in a second",
                extra={"event": "decoder_start_failed", "model": self.name, "reason": str(exc)},
            )
            self._owe()
            return
        self._decoders.add(decoder)
        self._idle.put_nowait(decoder)

    def _replace(self, decoder: _Decoder) -> None:
        """Retire a dead decoder and start another: at once, or paced when deaths are frequent."""
        self._retire(decoder)
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESPAWN_WINDOW_S] + [now]
        if len(self._deaths) <= self._count:
            self._add()
            return
        if self._respawn is None:
            log.warning(
                "decoder processes keep failing: starting one a second",
                extra={"event": "decoders_paced", "model": self.name, "deaths": len(self._deaths)},
            )
        self._owe()

    def _owe(self) -> None:
        """One more decoder to start at the pace of one a second."""
        self._owed += 1
        if self._respawn is None:
            self._respawn = asyncio.get_running_loop().call_later(RESPAWN_DELAY_S, self._paced)

    def _paced(self) -> None:
        self._respawn = None
        self._owed -= 1
        self._add()  # on failure it owes the decoder again
        if self._owed and not self._closed and self._respawn is None:
            self._respawn = asyncio.get_running_loop().call_later(RESPAWN_DELAY_S, self._paced)

    def _retire(self, decoder: _Decoder) -> None:
        self._decoders.discard(decoder)
        decoder.stop()


class _Decoder:
    """One decoder process and the server's end of its socket pair."""

    def __init__(self, process: subprocess.Popen, sock: socket.socket) -> None:
        self.process = process
        self.sock = sock

    @classmethod
    def start(cls) -> _Decoder:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "server.pipelines.decoder_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        return cls(process, ours)

    async def run(
        self, data: bytes, what: str, height: int, width: int, pad: int, max_pixels: int
    ) -> Letterboxed:
        loop = asyncio.get_running_loop()
        label = what.encode()
        job = JOB.pack(height, width, pad, max_pixels, len(label), len(data))
        await loop.sock_sendall(self.sock, job + label)
        await loop.sock_sendall(self.sock, data)
        status, scale, pad_x, pad_y, w, h, size = ANSWER.unpack(
            await receive_exactly(loop, self.sock, ANSWER.size)
        )
        if status != OK:
            message = (await receive_exactly(loop, self.sock, size)).decode()
            if status == INVALID:
                raise VolleyError(ErrorKind.INVALID_ARGUMENT, message)
            request_id = new_request_id()  # the client gets the id, the log the details
            log.error(
                "decoding failed in a decoder process",
                extra={"event": "unexpected_error", "request_id": request_id, "reason": message},
            )
            raise internal(f"{what}: decoding failed", request_id)
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        await receive_into(loop, self.sock, memoryview(pixels).cast("B"))
        return Letterboxed(pixels, scale, pad_x, pad_y, w, h)

    def stop(self) -> None:
        self.sock.close()  # the decoder reads end-of-file and exits
        self.process.kill()
        self.process.wait()


def _retrieve(job: asyncio.Future) -> None:
    """Mark a job's error as seen: its caller may have left before it ended."""
    if not job.cancelled():
        job.exception()
