"""Triton's system shared-memory extension: tensors a client on the same host leaves in a POSIX
shared-memory object (`/dev/shm/<key>`), named by region instead of sent in the request.

Off unless `volley serve --allow-client-shm` (as Triton's `--allow-client-shm`): a region lets
a client make the server read and write a shared-memory object of its choosing, which only
clients on the same host, trusted as the server's user, should do.

The server never maps a region: it reads inputs and writes outputs with `pread`/`pwrite` on the
file it opened at registration. A client that shrinks its object afterwards then gets an error
for the bytes that are gone, where a mapping would have killed the server with SIGBUS.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from server.errors import ErrorKind, VolleyError, invalid, region_already_registered
from server.types import SharedMemoryRef

SHM_FOLDER = "/dev/shm"
MAX_REGIONS = 256
KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,255}")
NAME_PARAMETER = "shared_memory_region"
SIZE_PARAMETER = "shared_memory_byte_size"
OFFSET_PARAMETER = "shared_memory_offset"


def shared_memory_ref(parameters: dict, kind: str, name: str) -> SharedMemoryRef | None:
    """The region the parameters of tensor `name` (an "input" or "output": `kind`) name; None:
    the tensor travels in the request."""
    if NAME_PARAMETER not in parameters:
        return None
    region = parameters[NAME_PARAMETER]
    size = parameters.get(SIZE_PARAMETER)
    offset = parameters.get(OFFSET_PARAMETER, 0)
    if not isinstance(region, str) or not region:
        raise invalid(f"{NAME_PARAMETER} of {kind} '{name}' must be a non-empty string")
    for value, parameter in ((size, SIZE_PARAMETER), (offset, OFFSET_PARAMETER)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise invalid(f"{parameter} of {kind} '{name}' must be a non-negative integer")
    return SharedMemoryRef(region, size, offset)


def check_registration(name: object, key: object, offset: object, byte_size: object) -> None:
    """Refuse (400) a registration whose arguments cannot name a region, before anything is
    opened (or, with workers, sent to the other processes)."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise invalid("a shared memory region needs a name of 1 to 255 characters")
    if not isinstance(key, str) or not KEY.fullmatch(key) or key.strip("/.") == "":
        raise invalid(
            f"shared memory key {str(key)[:80]!r} is not a shared-memory object name "
            "(letters, digits, '_', '-', '.', one optional leading '/')"
        )
    for value, field in ((offset, "offset"), (byte_size, "byte_size")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise invalid(f"'{field}' of shared memory region '{name}' must be an integer >= 0")
    if byte_size == 0:
        raise invalid(f"shared memory region '{name}' has byte_size 0")


@dataclass
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int


class SystemSharedMemory:
    """The regions clients registered, by name."""

    def __init__(
        self, max_read_bytes: int, folder: str = SHM_FOLDER, max_regions: int = MAX_REGIONS
    ) -> None:
        self.max_read_bytes = max_read_bytes  # per input, as --max-request-bytes bounds a body
        self.folder = folder
        self.max_regions = max_regions
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open the shared-memory object `key` and name `byte_size` bytes of it from `offset`."""
        check_registration(name, key, offset, byte_size)
        if name in self._regions:
            raise region_already_registered(name)
        if len(self._regions) >= self.max_regions:
            raise VolleyError(
                ErrorKind.QUEUE_FULL,
                f"{self.max_regions} shared memory regions are registered already; "
                "unregister one first",
            )
        path = os.path.join(self.folder, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise invalid(f"Unable to open shared memory region: '{key}': {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < offset + byte_size:
            os.close(fd)
            raise invalid(
                f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                f"exceeds the {info.st_size} bytes of '{key}'"
            )
        self._regions[name] = _Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str = "") -> None:
        """Forget region `name` (all of them when empty); an unknown name is no error."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str = "") -> list[dict]:
        """The registered regions (one, when named), as Triton lists them."""
        if name and name not in self._regions:
            raise VolleyError(
                ErrorKind.NOT_FOUND, f"Unable to find system shared memory region: '{name}'"
            )
        regions = [self._regions[name]] if name else list(self._regions.values())
        return [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ]

    def read(self, ref: SharedMemoryRef, what: str) -> bytes:
        """The `ref.byte_size` bytes `ref` points at, for `what` (an input)."""
        if ref.byte_size > self.max_read_bytes:
            raise VolleyError(
                ErrorKind.TOO_LARGE,
                f"{what}: {ref.byte_size} bytes in shared memory exceed {self.max_read_bytes} "
                "bytes (--max-request-bytes)",
            )
        region, start = self._locate(ref, ref.byte_size, what)
        data = os.pread(region.fd, ref.byte_size, start)
        if len(data) != ref.byte_size:
            raise invalid(f"{what}: shared memory region '{ref.region}' was truncated")
        return data

    def write(self, ref: SharedMemoryRef, data: bytes, what: str) -> None:
        """Put `data` where `ref` points, for `what` (an output); it must fit in ref.byte_size."""
        if len(data) > ref.byte_size:
            raise invalid(
                f"shared memory size specified with the request for {what} ({ref.byte_size} "
                f"bytes) should be at least {len(data)} bytes to hold the results"
            )
        region, start = self._locate(ref, len(data), what)
        os.pwrite(region.fd, data, start)

    def _locate(self, ref: SharedMemoryRef, size: int, what: str) -> tuple[_Region, int]:
        region = self._regions.get(ref.region)
        if region is None:
            raise invalid(f"{what}: Unable to find shared memory region: '{ref.region}'")
        if ref.offset + size > region.byte_size:
            raise invalid(
                f"{what}: {size} bytes at offset {ref.offset} exceed shared memory region "
                f"'{ref.region}' ({region.byte_size} bytes)"
            )
        return region, region.offset + ref.offset
