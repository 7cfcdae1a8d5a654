"""An optional per-client rate limit on inference requests (`--rate-limit`).

A token bucket per client address: `rate` requests a second on average, bursts of up to `burst`.
Past it a request is refused at once with 429 / RESOURCE_EXHAUSTED, before any work is done on
it. The table of clients is bounded: the least recently seen client is forgotten first.

With `--workers N` one client's connections are spread over the workers, so buckets of
each worker's own would let a client through up to N times its limit: there the workers keep
their buckets in one file they all map (`SharedRateLimiter`).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections import OrderedDict
from pathlib import Path

from server.errors import ErrorKind, VolleyError

MAX_CLIENTS = 65_536
WAYS = 8  # slots a client may take in the shared table: its set, chosen by its address's hash
_SLOT = struct.Struct("<Qdd")  # client key (0: a free slot), tokens left, when last seen


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
        if not self._take(client, time.monotonic()):
            raise VolleyError(
                ErrorKind.RATE_LIMITED,
                f"client {client} is over its rate limit of {self.rate:g} requests/s "
                f"(bursts of {self.burst:g}); slow down",
            )

    def _take(self, client: str, now: float) -> bool:
        """Refill `client`'s bucket for the time since it was last seen and take a token from
        it if one is there; whether one was."""
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens, allowed = self._refill_and_take(tokens, last, now)
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed

    def _refill_and_take(self, tokens: float, last: float, now: float) -> tuple[float, bool]:
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return (tokens - 1.0, True) if tokens >= 1.0 else (tokens, False)


class SharedRateLimiter(RateLimiter):
    """The same buckets in a file that every worker process maps (`--workers N`).

    The table has `MAX_CLIENTS` slots in sets of `WAYS`; a client's address hashes to one set,
    where it takes a free slot or the least recently seen one. A set is locked (`lockf` on its
    bytes) while a worker refills and takes from a bucket in it, so two workers never both
    spend a client's last token. `time.monotonic` is the same clock in every process."""

    def __init__(self, path: Path, rate: float, burst: float | None = None) -> None:
        super().__init__(rate, burst)
        size = MAX_CLIENTS * _SLOT.size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # zero-filled: every slot free
        self._table = mmap.mmap(self._fd, size)

    def _take(self, client: str, now: float) -> bool:
        digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "little") or 1  # 0 marks a free slot
        first = key % (MAX_CLIENTS // WAYS) * WAYS
        start, length = first * _SLOT.size, WAYS * _SLOT.size
        fcntl.lockf(self._fd, fcntl.LOCK_EX, length, start)
        try:
            slot, tokens, last = self._find(key, first, now)
            tokens, allowed = self._refill_and_take(tokens, last, now)
            _SLOT.pack_into(self._table, slot * _SLOT.size, key, tokens, now)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start)
        return allowed

    def _find(self, key: int, first: int, now: float) -> tuple[int, float, float]:
        """The slot of `key` in its set with its tokens and when it was last seen; a client not
        there gets the set's free or least recently seen slot and a full bucket."""
        oldest, oldest_seen = first, float("inf")
        for slot in range(first, first + WAYS):
            held, tokens, last = _SLOT.unpack_from(self._table, slot * _SLOT.size)
            if held == key:
                return slot, tokens, last
            seen = last if held else float("-inf")
            if seen < oldest_seen:
                oldest, oldest_seen = slot, seen
        return oldest, self.burst, now


def grpc_peer_address(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:127.0.0.1:5000" -> "127.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
