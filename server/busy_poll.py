"""Busy polling: after the last held request is answered, the event loop keeps polling its
sockets for a while instead of sleeping (`volley serve --busy-poll-us`).

A loop that sleeps between two requests wakes up cold: the kernel has to reschedule it (on a
virtual machine, a halted vCPU has to be woken) and the code and data of the request path have
left the CPU's caches. At one request at a time that costs more than the request itself. While
it polls, the loop runs an iteration at a time with a zero I/O timeout, so the next request is
read as it lands; between iterations it yields its core to any other thread that wants it (a
client's on the same machine, an instance thread). The price is CPU: while requests keep coming
with gaps shorter than the window, the loop's core stays busy. Off by default (measured in
bench/RESULTS.md, "Busy polling after the last answer").
"""

from __future__ import annotations

import asyncio
import os
import time


class BusyPoll:
    """Keeps an event loop polling until `window_us` after the last `touch`."""

    __slots__ = ("_loop", "_window_ns", "_until_ns", "_polling")

    def __init__(self, loop: asyncio.AbstractEventLoop, window_us: int) -> None:
        self._loop = loop
        self._window_ns = window_us * 1000
        self._until_ns = 0
        self._polling = False

    @property
    def polling(self) -> bool:
        """Whether the loop is polling now."""
        return self._polling

    def touch(self) -> None:
        """Poll for the whole window from now (called on the loop)."""
        self._until_ns = time.perf_counter_ns() + self._window_ns
        if not self._polling:
            self._polling = True
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        # A pending callback makes the loop's next wait for I/O a zero-timeout poll.
        if time.perf_counter_ns() < self._until_ns:
            os.sched_yield()  # a thread waiting for this core (a client's, say) runs first
            self._loop.call_soon(self._poll)
        else:
            self._polling = False
