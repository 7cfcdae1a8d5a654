"""API keys: who may call what.

`--api-keys FILE` names a YAML file of keys, each with a scope:

    keys:
      - name: camera-app        # logged, never the key itself
        key: "s3cret-and-long"  # or  sha256: "<hex digest of the key>"
        scope: infer            # infer | admin

`infer` may run inference (HTTP, WebSocket, gRPC unary and stream) and read health, metadata
and model configs; `admin` may also load and unload models (where the model-control mode
allows it), read statistics and metrics, and list the repository. Liveness needs no key. Keys
travel as `Authorization: Bearer <key>` (HTTP header, gRPC metadata), or for a browser's
WebSocket as the `api_key` query parameter. A presented key is hashed and compared with every
known digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import yaml

INFER, ADMIN = "infer", "admin"
SCOPES = (INFER, ADMIN)

# gRPC methods an `infer` key may call; every other method needs `admin`.
GRPC_INFER_METHODS = frozenset(
    {
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
        "ModelStreamInfer",
        "ServerReflectionInfo",  # gRPC server reflection: describes what the key may call
    }
)
GRPC_PUBLIC_METHODS = frozenset({"ServerLive"})
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # gRPC's standard probe: public too
# The camera page is static (its WebSocket needs a key): a browser cannot send headers to load it.
HTTP_PUBLIC_PATHS = frozenset({"/v2/health/live", "/camera"})


class KeyFileError(Exception):
    """The key file is missing or malformed: the server does not start."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    scope: str


class ApiKeys:
    """The keys of a key file, checked in constant time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        if not keys:
            raise KeyFileError("the key file holds no key")
        self.keys = keys

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """Read and check a key file (see the module docstring)."""
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise KeyFileError(f"{path}: cannot read the key file: {exc}") from None
        entries = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise KeyFileError(f"{path}: expected a 'keys' list")
        keys = []
        for i, entry in enumerate(entries):
            where = f"{path}: keys[{i}]"
            if not isinstance(entry, dict) or set(entry) - {"name", "key", "sha256", "scope"}:
                raise KeyFileError(f"{where}: expected name, key (or sha256) and scope")
            if entry.get("scope") not in SCOPES:
                raise KeyFileError(f"{where}: scope must be one of {', '.join(SCOPES)}")
            if ("key" in entry) == ("sha256" in entry):
                raise KeyFileError(f"{where}: give either key or sha256")
            if "key" in entry:
                key = str(entry["key"])
                if len(key) < 16:
                    raise KeyFileError(f"{where}: a key needs at least 16 characters")
                digest = hashlib.sha256(key.encode()).digest()
            else:
                try:
                    digest = bytes.fromhex(str(entry["sha256"]))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise KeyFileError(f"{where}: sha256 must be 64 hex digits")
            keys.append(ApiKey(str(entry.get("name", f"key-{i}")), digest, entry["scope"]))
        return cls(keys)

    def identify(self, presented: str | None) -> ApiKey | None:
        """The key `presented` is, or None; the time taken does not depend on which matched."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.keys:  # no early exit: every digest is compared
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def allows(key: ApiKey, needed: str) -> bool:
    """Whether `key` reaches what needs scope `needed`."""
    return key.scope == ADMIN or needed == INFER


def http_scope(path: str) -> str | None:
    """The scope an HTTP route needs (None: public)."""
    if path in HTTP_PUBLIC_PATHS:
        return None
    if path.startswith("/v2/repository/") or path.endswith("/stats") or path == "/metrics":
        return ADMIN
    if path == "/v2/logging" or path.endswith("/trace/setting"):
        return ADMIN
    if "sharedmemory" in path or path == "/v2/openapi.json" or path.startswith("/docs"):
        return ADMIN
    return INFER


def grpc_scope(method: str) -> str | None:
    """The scope a gRPC method (`/inference.GRPCInferenceService/Name`) needs (None: public)."""
    name = method.rsplit("/", 1)[-1]
    if name in GRPC_PUBLIC_METHODS or method == GRPC_HEALTH_CHECK:
        return None
    return INFER if name in GRPC_INFER_METHODS else ADMIN


def refusal(keys: ApiKeys, presented: str | None, needed: str) -> tuple[bool, str] | None:
    """Why a call needing scope `needed` is refused: (authenticated, message), or None when
    it may go ahead. Not authenticated: 401 / UNAUTHENTICATED; authenticated with too small a
    scope: 403 / PERMISSION_DENIED."""
    key = keys.identify(presented)
    if key is None:
        what = "unknown API key" if presented else "no API key"
        return False, f"{what}: send 'Authorization: Bearer <key>' (this server has --api-keys)"
    if not allows(key, needed):
        return True, f"API key '{key.name}' has scope '{key.scope}'; this call needs '{needed}'"
    return None
