"""How many requests this process holds: read by a transport and not yet answered.

The transports count them as soon as a request is read, before its handler runs, so a batcher
can tell a request that is alone in the server (the only one held) from one of many read in
the same loop iteration (`Batcher` runs only the former inline). When the count falls to zero
the server is idle, and a `BusyPoll`, where one is set, may keep the loop polling for the next;
it is told too when a request comes to an idle server.
"""

from __future__ import annotations

import asyncio

from server.busy_poll import BusyPoll


class HeldRequests:
    """A count the transports raise when they read an inference request and lower when they
    have answered it."""

    __slots__ = ("count", "busy_poll")

    def __init__(self) -> None:
        self.count = 0
        self.busy_poll: BusyPoll | None = None

    def add(self) -> None:
        """Count one request more (its transport has read it); `release` it once answered."""
        if self.count == 0 and self.busy_poll is not None:
            self.busy_poll.busy()
        self.count += 1

    def hold(self, task: asyncio.Task) -> None:
        """Count a request answered by `task` until the task ends, however it ends (also when
        it is cancelled before it ever ran)."""
        self.add()
        task.add_done_callback(self._release)

    def release(self) -> None:
        """Count one request less (the transport has answered it, or never will)."""
        self.count -= 1
        if self.count == 0 and self.busy_poll is not None:
            self.busy_poll.idle()

    def _release(self, _: asyncio.Task) -> None:
        self.release()


HELD = HeldRequests()
