"""The PyTorch/ONNX Runtime comparison rules used by every training script's export check."""

from __future__ import annotations

import numpy as np
import pytest

from training.detector.parity import detection_difference
from training.export import relative_difference


def detections(rows: list[list[float]]) -> np.ndarray:
    return np.asarray([rows], dtype=np.float32)


BASE = [
    [10.0, 10.0, 50.0, 60.0, 0.90, 3.0],
    [100.0, 20.0, 140.0, 70.0, 0.40, 1.0],
    [200.0, 200.0, 230.0, 250.0, 0.40000001, 7.0],  # tied with the row above
    [5.0, 5.0, 9.0, 9.0, 0.01, 2.0],
]


def test_relative_difference_floors_small_magnitudes() -> None:
    want = np.array([100.0, 1e-7, 0.0], dtype=np.float32)
    have = np.array([100.01, 2e-7, 5e-6], dtype=np.float32)
    np.testing.assert_allclose(relative_difference(have, want), [1e-4, 1e-6, 5e-5], rtol=1e-3)


def test_identical_detections_differ_by_nothing() -> None:
    assert detection_difference(detections(BASE), detections(BASE)) == 0.0


def test_tied_detections_may_swap_places() -> None:
    swapped = [BASE[0], BASE[2], BASE[1], BASE[3]]
    assert detection_difference(detections(swapped), detections(BASE)) < 1e-6


def test_a_twin_of_the_last_detection_may_replace_it() -> None:
    twin = [*BASE[:3], [300.0, 8.0, 310.0, 20.0, 0.0100001, 9.0]]
    assert detection_difference(detections(twin), detections(BASE)) < 1e-4


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        (0, 0, 10.1),  # a box edge moved by 0.1 px
        (1, 5, 2.0),  # another class
        (0, 4, 0.91),  # another score
    ],
)
def test_real_differences_are_caught(row: int, column: int, value: float) -> None:
    changed = [list(r) for r in BASE]
    changed[row][column] = value
    assert detection_difference(detections(changed), detections(BASE)) > 1e-3


def test_untied_detections_may_not_swap() -> None:
    swapped = [BASE[1], BASE[0], BASE[2], BASE[3]]
    assert detection_difference(detections(swapped), detections(BASE)) > 0.5
