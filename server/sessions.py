"""Long-lived streams (gRPC `ModelStreamInfer`, WebSocket camera sessions) and shutdown.

A stream's client sends until its stream ends, so a drain cannot wait for it to go quiet: on
shutdown the server stops each stream's reading instead (`DataPlane.end_sessions`). It does so
only while the stream waits for the client's next message, never halfway through taking one:
a message that was read is always answered, even when taking it had to wait (for the stream's
in-flight bound, or for room in a slow reader's queue of answers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

SHUTTING_DOWN = "server is shutting down"


class SessionEnded(Exception):
    """The server is shutting down: the stream reads no more messages."""


class Session:
    """The reading side of one open stream, which the server's shutdown may end."""

    def __init__(self, unregister: Callable[[Session], None]) -> None:
        self.ended = False  # by the server: what the client sent after it is not taken
        self._unregister = unregister
        self._receiving: asyncio.Task | None = None  # the reader, while it waits for a message
        self._interrupted = False

    async def receive(self, next_message: Callable[[], Awaitable[T]]) -> T:
        """The client's next message; raises `SessionEnded` once the server ends the stream,
        at once if the stream is waiting for one."""
        if self.ended:
            raise SessionEnded
        task = self._receiving = asyncio.current_task()
        try:
            return await next_message()
        except asyncio.CancelledError:
            if self._interrupted and task.uncancel() == 0:  # ours, not the client leaving
                raise SessionEnded from None
            raise
        finally:
            self._receiving = None

    def end(self) -> None:
        """Stop reading: now if the stream waits for a message, else before it waits again."""
        self.ended = True
        if self._receiving is not None and not self._interrupted:
            self._interrupted = True
            self._receiving.cancel()

    def close(self) -> None:
        """The stream is over: the server no longer needs to end it."""
        self._unregister(self)
