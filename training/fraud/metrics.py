"""Ranking and operating-point metrics for fraud scores."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

TARGET_FPR = 0.01


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = TARGET_FPR) -> float:
    """Best recall (TPR) whose false-positive rate on these labels is at most `fpr`."""
    false_pos, true_pos, _ = roc_curve(labels, scores)
    return float(true_pos[false_pos <= fpr].max())


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Average precision (PR-AUC), ROC-AUC and recall at TARGET_FPR."""
    return {
        "average_precision": float(average_precision_score(labels, scores)),
        "roc_auc": float(roc_auc_score(labels, scores)),
        "recall_at_1pct_fpr": recall_at_fpr(labels, scores),
    }


def operating_point(labels: np.ndarray, decisions: np.ndarray) -> dict[str, float]:
    """FPR, recall and precision of hard decisions."""
    decisions = decisions.astype(bool)
    positives = labels == 1
    flagged = int(decisions.sum())
    return {
        "fpr": float(decisions[~positives].mean()),
        "recall": float(decisions[positives].mean()),
        "precision": float(decisions[positives].sum() / flagged) if flagged else 0.0,
        "flagged": flagged,
    }


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Brier score, expected calibration error (equal-mass bins) and mean predicted vs. actual."""
    order = np.argsort(probabilities, kind="stable")
    gaps = [
        abs(probabilities[idx].mean() - labels[idx].mean()) * len(idx)
        for idx in np.array_split(order, bins)
    ]
    return {
        "brier": float(np.mean((probabilities - labels) ** 2)),
        "ece": float(sum(gaps) / len(labels)),
        "mean_probability": float(probabilities.mean()),
        "fraud_rate": float(labels.mean()),
    }
