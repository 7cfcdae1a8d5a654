"""Busy polling: after the last held request is answered, the event loop keeps polling its
sockets for a while instead of sleeping (`volley serve --busy-poll-us`, `--busy-poll-always`).

A loop that sleeps between two requests wakes up cold: the kernel has to reschedule it (on a
virtual machine, a halted vCPU has to be woken) and the code and data of the request path have
left the CPU's caches. At one request at a time that costs more than the request itself. While
it polls, the loop runs an iteration at a time with a zero I/O timeout, so the next request is
read as it lands; between iterations it yields its core to any other thread that wants it (a
client's, an instance thread).

It polls only while it holds no request: the first one to come ends the poll, so the loop never
competes for the CPU or the GIL with the threads working on requests (decoders, instance
threads). The price is CPU, so by default the poll is adaptive: the loop polls after going idle
only when the request that ended its last idle time came within the window. A client sending
one request after another keeps it polling; a lone or sparse request finds it asleep and leaves
it asleep, and a burst that ends costs one window. `always` polls after every answer (measured
in bench/RESULTS.md, "Busy polling after the last answer" and "adaptive busy polling, on by
default").
"""

from __future__ import annotations

import asyncio
import os
import time


class BusyPoll:
    """Keeps an event loop polling for `window_us` after it goes `idle`: every time, or
    (adaptive) only when the request that ended its previous idle time came within the window."""

    __slots__ = ("_loop", "_window_ns", "_always", "_until_ns", "_polling", "_idle_ns", "_close")

    def __init__(self, loop: asyncio.AbstractEventLoop, window_us: int, always: bool) -> None:
        self._loop = loop
        self._window_ns = window_us * 1000
        self._always = always
        self._until_ns = 0
        self._polling = False
        self._idle_ns = 0  # when the loop last went idle
        self._close = False  # the last request came within the window of that

    @property
    def polling(self) -> bool:
        """Whether the loop is polling now."""
        return self._polling

    def busy(self) -> None:
        """A request has come to an idle loop (called on the loop): polling ends, so that the
        loop does not take the CPU and the GIL from the threads that work on the request."""
        self._close = time.perf_counter_ns() - self._idle_ns <= self._window_ns
        self._until_ns = 0

    def idle(self) -> None:
        """The loop has nothing left to answer: poll for the window from now, if it should."""
        now = time.perf_counter_ns()
        self._idle_ns = now
        if not (self._always or self._close):
            return
        self._until_ns = now + self._window_ns
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
