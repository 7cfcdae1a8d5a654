"""Comparing decoded detections from two runtimes when near-tied scores may swap places."""

from __future__ import annotations

import numpy as np

from training.export import MAGNITUDE_FLOOR, PARITY_TOLERANCE, relative_difference

SCORE = 4  # column of the score in a detection row (see decode.DETECTION_FIELDS)


def detection_difference(have: np.ndarray, want: np.ndarray) -> float:
    """Largest relative difference between two same-shaped [N,k,6] detection outputs.

    Two runtimes differ in the last bits, so two detections whose scores are closer than that
    may come out in either order, and one tied with the k-th score may be replaced by its twin
    just below the cut. So the sorted scores are compared position by position, and every other
    row must equal some row of the other output (rows tied with the cut are exempt).
    """
    worst = float(relative_difference(have[..., SCORE], want[..., SCORE]).max(initial=0.0))
    for mine, theirs in zip(have, want, strict=True):
        pairwise = relative_difference(mine[:, None, :], theirs[None, :, :]).max(axis=-1)
        cut = min(mine[-1, SCORE], theirs[-1, SCORE])
        tie = PARITY_TOLERANCE * max(abs(float(cut)), MAGNITUDE_FLOOR)
        above_mine = mine[:, SCORE] > cut + tie
        above_theirs = theirs[:, SCORE] > cut + tie
        worst = max(
            worst,
            float(pairwise.min(axis=1)[above_mine].max(initial=0.0)),
            float(pairwise.min(axis=0)[above_theirs].max(initial=0.0)),
        )
    return worst
