"""The MLP, its Platt calibration, and the exported graph that wraps both with normalisation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    """Feed-forward network from standardised features to one fraud logit."""

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FraudScorer(nn.Module):
    """Raw features -> (calibrated probability `score`, decision `is_fraud = score >= threshold`).

    Everything a client would otherwise have to reproduce (log(1 + x) of the heavy-tailed
    features flagged in `log_mask`, standardisation with the training mean/std, the network,
    Platt scaling) lives in this one graph.
    """

    def __init__(
        self,
        net: MLP,
        log_mask: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        platt: tuple[float, float],
        threshold: float = 0.5,
    ):
        super().__init__()
        self.net = net
        self.register_buffer("log_mask", torch.as_tensor(log_mask, dtype=torch.bool))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(1.0 / std, dtype=torch.float32))
        self.register_buffer("platt_a", torch.tensor(platt[0], dtype=torch.float32))
        self.register_buffer("platt_b", torch.tensor(platt[1], dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.net(self.normalise(features))
        # 1 / (1 + exp(-z)) rather than sigmoid: ONNX Runtime's Sigmoid kernel is an approximation
        # that is off by ~5e-4 relative for small probabilities, its Exp is accurate.
        score = 1.0 / (1.0 + torch.exp(-(logit * self.platt_a + self.platt_b)))
        return score, score >= self.threshold

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """Log-compress the flagged features, then standardise: the network's actual input."""
        compressed = torch.log(torch.clamp(features, min=0.0) + 1.0)
        return (torch.where(self.log_mask, compressed, features) - self.mean) * self.inv_std


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the log loss of sigmoid(a * logit + b) on `labels`."""
    x = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")
    loss_fn = nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(params[0] * x + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = params.detach().tolist()
    return float(a), float(b)


def threshold_for_fpr(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> float:
    """Smallest float32 threshold t with FPR(score >= t) <= target_fpr on these labels."""
    negatives = np.sort(scores[labels == 0].astype(np.float32))[::-1]
    allowed = int(np.floor(target_fpr * len(negatives)))
    if allowed >= len(negatives):
        return 0.0
    return float(np.nextafter(negatives[allowed], np.float32(np.inf)))
