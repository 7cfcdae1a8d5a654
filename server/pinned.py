"""Page-locked (pinned) host buffers for copies to and from a GPU, without PyTorch or CuPy.

A copy from pageable memory goes through a driver bounce buffer; from page-locked memory the GPU
reads it directly, at about twice the speed (docs/vision.md has the figures). ONNX Runtime's
Python API cannot allocate pinned memory, so the buffers here are anonymous memory maps (page
aligned) registered with the CUDA runtime that ONNX Runtime's CUDA provider already loaded.
Where there is no CUDA runtime, the same buffers are plain memory and everything still works.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import weakref
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CUDA_RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


@cache
def cuda_runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library of this process (the one ONNX Runtime loaded), if any."""
    candidates = [*_loaded_libraries("libcudart.so"), *CUDA_RUNTIME_NAMES]
    for name in candidates:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        library.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        library.cudaHostRegister.restype = ctypes.c_int
        library.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        library.cudaHostUnregister.restype = ctypes.c_int
        return library
    return None


def _loaded_libraries(prefix: str) -> list[str]:
    """Paths of shared libraries already mapped into this process whose name starts so."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in lines if "/" in line}
    return sorted(p for p in paths if Path(p).name.startswith(prefix))


def pinned_empty(
    shape: tuple[int, ...], dtype: np.dtype, pin: bool = True
) -> tuple[np.ndarray, bool]:
    """An uninitialised array in page-aligned memory, page-locked if `pin` and CUDA allow.

    Returns the array and whether it is pinned. The registration is undone when the array
    (and every view of it) is gone.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    size = max(count * dtype.itemsize, 1)
    memory = mmap.mmap(-1, size)
    array = np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)
    runtime = cuda_runtime() if pin else None
    if runtime is None:
        return array, False
    address = array.ctypes.data
    status = runtime.cudaHostRegister(address, size, 0)
    if status != 0:
        log.warning(
            "could not pin a staging buffer; copies to the GPU use pageable memory",
            extra={"event": "pin_failed", "bytes": size, "cuda_error": status},
        )
        return array, False
    weakref.finalize(array, runtime.cudaHostUnregister, address)
    return array, True
