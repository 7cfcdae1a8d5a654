"""Volley's Python SDK and the `volley detect` / `volley camera` clients, on tritonclient.

`VolleyClient` (sync) and `AsyncVolleyClient` (asyncio) speak gRPC ("host:port") or HTTP
("http://host:port"): `score`, `detect`, `detect_many`, `stream`, generic `infer`.
"""

from clients.aio import AsyncVolleyClient
from clients.core import FrameResult, FraudScores, ModelInfo
from clients.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    Unavailable,
    VolleyError,
)
from clients.sdk import VolleyClient
from clients.vision import Detection

__all__ = [
    "AsyncVolleyClient",
    "DeadlineExceeded",
    "Detection",
    "FraudScores",
    "FrameResult",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "Unavailable",
    "VolleyClient",
    "VolleyError",
]
