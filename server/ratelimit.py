"""An optional per-client rate limit on inference requests (`--rate-limit`).

A token bucket per client address: `rate` requests a second on average, bursts of up to `burst`.
Past it a request is refused at once with 429 / RESOURCE_EXHAUSTED, before any work is done on
it. The table of clients is bounded: the least recently seen client is forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from server.errors import ErrorKind, VolleyError

MAX_CLIENTS = 65_536


class RateLimiter:
    """Token buckets keyed by client address."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, client: str) -> None:
        """Take one token for `client`, or raise 429 when its bucket is empty."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        if not allowed:
            raise VolleyError(
                ErrorKind.RATE_LIMITED,
                f"client {client} is over its rate limit of {self.rate:g} requests/s "
                f"(bursts of {self.burst:g}); slow down",
            )


def grpc_peer_address(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:127.0.0.1:5000" -> "127.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
