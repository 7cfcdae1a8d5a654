"""Joining requests' rows into one batch (`server.copies.join_rows`, used by every gather)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.copies import HELD_COPY_BYTES, join_rows

DTYPES = ["uint8", "int32", "int64", "float16", "float32", "float64", "bool", ">f4", "<i2"]


@st.composite
def batches(draw):
    """Parts of one item shape, some of another dtype or not contiguous, and the batch's dtype."""
    # Rows of an image's size (the copies numpy would let the GIL go for) or a few values.
    big = draw(st.booleans())
    item = (16384,) if big else tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    out_dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    parts = []
    for seed in range(draw(st.integers(1, 6))):
        rows = draw(st.integers(0, 8))
        dtype = draw(
            st.sampled_from([out_dtype, out_dtype, np.dtype(draw(st.sampled_from(DTYPES)))])
        )
        values = np.random.default_rng(seed).integers(0, 100, (rows * 2, *item))
        part = values.astype(dtype)
        parts.append(part[::2] if draw(st.booleans()) else part[:rows])  # strided or contiguous
    return parts, out_dtype


@settings(max_examples=300, deadline=None)
@given(batches())
def test_joined_rows_equal_numpy_concatenation_into_the_batch(case):
    parts, dtype = case
    rows = sum(len(p) for p in parts)
    out = np.empty((rows, *parts[0].shape[1:]), dtype)
    expected = np.empty_like(out)
    try:
        np.concatenate(parts, out=expected)
    except TypeError:  # a cast numpy refuses (say, int32 rows into uint8): refused the same
        with pytest.raises(TypeError):
            join_rows(parts, out)
        return
    joined = join_rows(parts, out)
    assert joined is out
    np.testing.assert_array_equal(joined, expected)


def test_large_parts_and_staging_buffer_views_are_joined_in_place():
    big = np.arange(HELD_COPY_BYTES // 8 + 16, dtype=np.float64).reshape(-1, 4)
    small = np.full((3, 4), -1.0)
    buffer = np.zeros((len(big) + 10, 4))
    out = join_rows([small, big], buffer[: len(big) + 3])
    assert out.base is buffer
    np.testing.assert_array_equal(buffer[: len(big) + 3], np.concatenate([small, big]))
    assert not buffer[len(big) + 3 :].any()  # nothing written past the batch


def test_parts_that_do_not_fit_the_batch_are_refused():
    row = 1 << 14  # float64 rows of 128 KiB: copied while holding the GIL
    with pytest.raises(ValueError):  # another item shape, even of the same byte size
        join_rows([np.zeros((1, 2, row)), np.zeros((1, row, 2))], np.empty((2, 2, row)))
    with pytest.raises(ValueError, match="3 rows joined into a batch of 4"):
        join_rows([np.zeros((1, row)), np.zeros((2, row))], np.empty((4, row)))
    with pytest.raises(ValueError):  # more rows than the batch
        join_rows([np.zeros((3, row)), np.zeros((2, row))], np.empty((4, row)))
    with pytest.raises(ValueError):  # small parts, joined by numpy, are checked as well
        join_rows([np.zeros((1, 2)), np.zeros((2, 2))], np.empty((4, 2)))
