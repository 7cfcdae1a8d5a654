"""The MLP, its Platt calibration, and the exported graph that wraps both with the derived
features and the normalisation."""

from __future__ import annotations

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


def derived_column(how: Derived, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """One derived column from its input columns (each [N, 1]), as the numpy reference does."""
    x = inputs[0] if how.cap is None else torch.clamp(inputs[0], max=how.cap)
    if how.op == "log1p":
        return log1p(x)
    if how.op == "is_night":
        return ((x >= 22.0) | (x < 6.0)).to(torch.float32)
    if how.op == "ratio":
        y = inputs[1]
        return torch.where(y > 0.0, x / y, 1.0)
    raise ValueError(f"unknown derivation {how.op!r}")


class DerivedFeatures(nn.Module):
    """Raw columns [N, R] -> the network's features [N, F], computed as `recipe` says.

    Passed-through columns are picked with one gather, each derived one is computed from its
    inputs, and a last gather puts all of them in the recipe's (the network's) order.
    """

    def __init__(self, raw_names: Sequence[str], recipe: Recipe) -> None:
        super().__init__()
        column = {name: i for i, name in enumerate(raw_names)}
        passed = [name for name, how in recipe.items() if isinstance(how, str)]
        derived = [name for name, how in recipe.items() if isinstance(how, Derived)]
        self.derivations = [recipe[name] for name in derived]
        self.inputs = [[column[c] for c in how.inputs] for how in self.derivations]
        picked = [column[recipe[name]] for name in passed]
        order = [(passed + derived).index(name) for name in recipe]
        self.register_buffer("picked", torch.tensor(picked, dtype=torch.int64))
        self.register_buffer("order", torch.tensor(order, dtype=torch.int64))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        columns = [raw.index_select(1, self.picked)]
        for how, inputs in zip(self.derivations, self.inputs, strict=True):
            columns.append(derived_column(how, [raw[:, i : i + 1] for i in inputs]))
        return torch.cat(columns, dim=1).index_select(1, self.order)


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

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.net(self.normalise(self.derive(raw)))
        # 1 / (1 + exp(-z)) rather than sigmoid: ONNX Runtime's Sigmoid kernel is an approximation
        # that is off by ~5e-4 relative for small probabilities, its Exp is accurate.
        score = 1.0 / (1.0 + torch.exp(-(logit * self.platt_a + self.platt_b)))
        return score, score >= self.threshold

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """Log-compress the flagged (derived) features, then standardise: the network's input."""
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
