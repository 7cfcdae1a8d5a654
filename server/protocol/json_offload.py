"""Large JSON infer bodies are decoded in a worker process, never on the event loop.

Decoding JSON tensor data costs about 15 ms per MB (orjson, then numpy), and both hold the GIL:
in a thread it would stall the event loop just the same, and with it every HTTP and gRPC call
of the server. Bodies whose JSON part is under `OFFLOAD_BYTES` (about 2 ms of work) are decoded
inline; larger ones go to one worker process, at most `slots` at a time: past that a client is
told to retry (429) before its body is even read, so memory stays bounded too.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from server.errors import ErrorKind, VolleyError
from server.protocol import http_codec
from server.types import InferenceRequest

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 128 * 1024
# The decoder runs at a lower priority than the server: a flood of large JSON bodies must not
# take the CPU that every other request needs.
WORKER_NICENESS = 10


class JsonOffload:
    """A lazily started one-process pool for large JSON bodies, with a bounded number of slots."""

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._busy = 0
        self._pool: ProcessPoolExecutor | None = None

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
        self, body: bytes, header_length: int | None, model: str, version: str
    ) -> InferenceRequest:
        """`http_codec.decode_request` in the worker process (the caller holds a slot)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor(), http_codec.decode_request, body, header_length, model, version
            )
        except BrokenProcessPool:
            log.error("JSON decoder process died", extra={"event": "json_offload_broken"})
            self._pool = None  # the next large body starts a fresh one
            raise VolleyError(
                ErrorKind.INTERNAL, "the JSON decoder process failed; see the server log"
            ) from None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the server process runs threads (batchers, gRPC core)
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=context, initializer=os.nice, initargs=(WORKER_NICENESS,)
            )
        return self._pool

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
