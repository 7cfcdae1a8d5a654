"""How many requests this process holds: read by a transport and not yet answered.

The transports count them as soon as a request is read, before its handler runs, so a batcher
can tell a request that is alone in the server (the only one held) from one of many read in
the same loop iteration (`Batcher` runs only the former inline).
"""

from __future__ import annotations

import asyncio


class HeldRequests:
    """A count the transports raise when they read an inference request and lower when they
    have answered it."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def hold(self, task: asyncio.Task) -> None:
        """Count a request answered by `task` until the task ends, however it ends (also when
        it is cancelled before it ever ran)."""
        self.count += 1
        task.add_done_callback(self._release)

    def _release(self, _: asyncio.Task) -> None:
        self.count -= 1


HELD = HeldRequests()
