"""The MLP, its Platt calibration, and the exported graph that wraps both with the derived
features and the normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from training.fraud.features import Derived, Recipe


def log1p(x: torch.Tensor) -> torch.Tensor:
    """log(1 + max(x, 0)) in float32, accurate for small x too (ONNX has no Log1p).

    Kahan's trick: with u = 1 + x rounded, log(u) * x / (u - 1) cancels the rounding of u.
    """
    x = torch.clamp(x, min=0.0)
    u = x + 1.0
    return torch.where(u == 1.0, x, torch.log(u) * (x / (u - 1.0)))


class DerivedFeatures(nn.Module):
    """Raw columns [N, R] -> the network's features [N, F], computed as `recipe` says.

    Every feature is computed at once, column-wise: one gather picks each feature's (first)
    input column and applies the caps, a second gives the ratios their denominators, masks
    choose the night test and the ratios, and `log1p` goes over the columns `logged` marks. A
    per-column graph would run each derivation as its own nodes (about twice as many nodes for
    a one-row request, each a kernel call).
    """

    def __init__(self, raw_names: Sequence[str], recipe: Recipe) -> None:
        super().__init__()
        column = {name: i for i, name in enumerate(raw_names)}
        derived = [how if isinstance(how, Derived) else None for how in recipe.values()]
        inputs = [how.inputs if isinstance(how, Derived) else (how,) for how in recipe.values()]
        ops = [how.op if how else "pass" for how in derived]
        unknown = set(ops) - {"pass", "log1p", "is_night", "ratio"}
        if unknown:
            raise ValueError(f"unknown derivation {sorted(unknown)}")

        def mask(op: str) -> torch.Tensor:
            return torch.tensor([o == op for o in ops])

        first = [column[names[0]] for names in inputs]
        second = [column[names[-1]] for names in inputs]
        cap = [how.cap if how and how.cap is not None else math.inf for how in derived]
        self.register_buffer("first", torch.tensor(first, dtype=torch.int64))
        self.register_buffer("second", torch.tensor(second, dtype=torch.int64))
        self.register_buffer("cap", torch.tensor(cap, dtype=torch.float32))
        self.register_buffer("night", mask("is_night"))
        self.register_buffer("ratio", mask("ratio"))
        self.register_buffer("logged", mask("log1p"))

    def unlogged(self, raw: torch.Tensor) -> torch.Tensor:
        """The features before `log1p` goes over the `logged` columns."""
        x = torch.minimum(raw.index_select(1, self.first), self.cap)
        denominator = torch.where(self.ratio, raw.index_select(1, self.second), 1.0)
        ratio = torch.where(denominator > 0.0, x / denominator, 1.0)
        is_night = ((x >= 22.0) | (x < 6.0)).to(torch.float32)
        return torch.where(self.night, is_night, ratio)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        features = self.unlogged(raw)
        return torch.where(self.logged, log1p(features), features)


def derive_features(raw: np.ndarray, raw_names: Sequence[str], recipe: Recipe) -> np.ndarray:
    """The network's features (float32 [N, F]) from raw columns, exactly as the graph does."""
    with torch.no_grad():
        return DerivedFeatures(raw_names, recipe)(torch.as_tensor(raw, dtype=torch.float32)).numpy()


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

    def folded(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
    ) -> torch.Tensor:
        """`a * net((x - shift) * scale) + b`, with both affine maps folded into the weights of
        the first and the last layer (the export turns the folded weights into constants, so
        the graph runs no extra nodes for them)."""
        first, *middle, last = self.layers
        weight = first.weight * scale
        x = nn.functional.linear(x, weight, first.bias - weight @ shift)
        for layer in middle:
            x = layer(x)
        return nn.functional.linear(x, last.weight * a, last.bias * a + b)


class FraudScorer(nn.Module):
    """Raw columns -> (calibrated probability `score`, decision `is_fraud = score >= threshold`).

    Everything a client would otherwise have to reproduce (the derived features of `derive`,
    log(1 + x) of the heavy-tailed features flagged in `log_mask`, standardisation with the
    training mean/std, the network, Platt scaling) lives in this one graph.
    """

    def __init__(
        self,
        derive: DerivedFeatures,
        net: MLP,
        log_mask: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        platt: tuple[float, float],
        threshold: float = 0.5,
    ):
        super().__init__()
        self.derive = derive
        self.net = net
        self.register_buffer("log_mask", torch.as_tensor(log_mask, dtype=torch.bool))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(1.0 / std, dtype=torch.float32))
        self.register_buffer("platt_a", torch.tensor(platt[0], dtype=torch.float32))
        self.register_buffer("platt_b", torch.tensor(platt[1], dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))
        if bool((self.log_mask & derive.logged).any()):
            raise ValueError("a feature derived by log1p cannot be log-compressed again")

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # normalise(derive(raw)) in one pass: the derived log1p columns and the log-compressed
        # ones get the same log1p (the two sets are disjoint), and the standardisation and the
        # Platt scaling are folded into the network's first and last layers.
        features = self.derive.unlogged(raw)
        x = torch.where(self.derive.logged | self.log_mask, log1p(features), features)
        logit = self.net.folded(x, self.mean, self.inv_std, self.platt_a, self.platt_b)
        # 1 / (1 + exp(-z)) rather than sigmoid: ONNX Runtime's Sigmoid kernel is an approximation
        # that is off by ~5e-4 relative for small probabilities, its Exp is accurate.
        score = torch.reciprocal(1.0 + torch.exp(-logit))
        return score, score >= self.threshold

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """Log-compress the flagged (derived) features, then standardise: the network's input."""
        compressed = torch.where(self.log_mask, log1p(features), features)
        return (compressed - self.mean) * self.inv_std


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
