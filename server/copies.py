"""Array copies that keep the GIL, for threads that run beside a busy event loop.

numpy lets the GIL go for a large copy (an image: yes; a row of features: no), and taking it
back waits up to the switch interval (5 ms) while another thread runs Python. A thread that
makes many such copies waits that long for each: a batch of 6 images joined with
`np.concatenate` took 31 ms beside one busy thread, 0.05 ms holding the GIL
(`bench/gil_convoy.py`). A plain memory copy of a few hundred KB holds it for microseconds.
"""

from __future__ import annotations

import numpy as np

HELD_COPY_BYTES = 8 << 20  # parts up to this size are copied without letting the GIL go
SMALL_PART_BYTES = 64 << 10  # numpy keeps the GIL for copies this small: one C call joins them


def join_rows(parts: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Copy `parts` one after another into `out` (as many rows as they have, in total).

    Contiguous parts up to `HELD_COPY_BYTES` of `out`'s (numeric) dtype and item shape go into
    a C-contiguous `out` as plain memory copies, holding the GIL; other parts go through numpy,
    which casts or refuses them, and whose copy of a larger part outlasts the wait for the GIL.
    Parts all under `SMALL_PART_BYTES` are joined by numpy in one call.
    """
    numeric = out.dtype.isnative and out.dtype.kind in "biuf"
    small = all(part.nbytes < SMALL_PART_BYTES for part in parts)
    if small or not (out.size and out.flags.c_contiguous and numeric):
        return np.concatenate(parts, out=out)
    flat = memoryview(out).cast("B")
    row_bytes = out.strides[0]
    row = 0
    for part in parts:
        end = row + len(part)
        same = part.dtype == out.dtype and part.shape[1:] == out.shape[1:]
        if same and 0 < part.nbytes <= HELD_COPY_BYTES and part.flags.c_contiguous:
            flat[row * row_bytes : end * row_bytes] = memoryview(part).cast("B")
        else:
            np.copyto(out[row:end], part)
        row = end
    if row != len(out):
        raise ValueError(f"{row} rows joined into a batch of {len(out)}")
    return out
