"""Cross-origin requests from browser apps: `volley serve --cors-origin ORIGIN` (repeatable).

A web page served from another origin (`https://app.example`) may call Volley's HTTP API from
the browser only if Volley says so: a preflight `OPTIONS` request is answered with what the page
may send (methods, headers), and every answer to an allowed origin names it in
`Access-Control-Allow-Origin`, so the page can read the answer, errors included. Without the
flag no CORS header is ever sent and browsers keep other origins out, as before. `*` allows any
origin; credentials (cookies) are never allowed, API keys travel in `Authorization`, which the
preflight lists by name. A preflight carries no credentials, so it is answered before (and
without) the API-key check.

Browsers apply no CORS to WebSockets, so the server checks their `Origin` itself: a WebSocket
from a page is taken from the server's own origin (`same_origin`) or one the flag allows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ALLOWED_METHODS = b"GET, POST, OPTIONS"
# What a page may send beyond the always-allowed headers: JSON or image bodies, API keys,
# Triton's binary tensor extension, compressed bodies.
ALLOWED_HEADERS = b"authorization, content-type, content-encoding, inference-header-content-length"
# What a page may read beyond the always-exposed headers: where a binary answer's JSON ends, and
# how long to wait after a 429 / 503.
EXPOSED_HEADERS = b"inference-header-content-length, retry-after"
PREFLIGHT_MAX_AGE = b"600"  # seconds a browser may keep a preflight's answer
# scheme://host[:port], as browsers send `Origin`
ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


class CorsPolicy:
    """Which origins may call the HTTP API from a browser, and the headers that say so."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origin.encode() for origin in origins if origin != "*")

    def answer_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """The headers of an answer to a request from `origin` (none for another origin)."""
        if origin is None or not (self.any or origin in self.origins):
            return []
        return [
            (b"access-control-allow-origin", b"*" if self.any else origin),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
            (b"vary", b"origin"),
        ]

    def preflight_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """The headers of the answer to a preflight `OPTIONS` from `origin` (none for another
        origin: the browser then refuses the page's request)."""
        allowed = self.answer_headers(origin)
        if not allowed:
            return []
        return [
            *allowed,
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        ]


def same_origin(origin: bytes, host: bytes | None) -> bool:
    """Whether `origin` (scheme://host[:port]) names the server the request reached (`host`,
    its Host header): a page the server itself served."""
    _, _, netloc = origin.partition(b"://")
    return host is not None and netloc.lower() == host.lower()


def check_origin(value: str) -> str:
    """A `--cors-origin` value: `*` or `scheme://host[:port]` (no path, no trailing slash)."""
    if value == "*" or ORIGIN.match(value):
        return value
    raise ValueError(
        f"--cors-origin {value!r} is not an origin: give scheme://host[:port] "
        "(e.g. https://app.example), or * for any"
    )
