"""MLP training: weighted loss for the class imbalance, early stopping on validation AP,
then Platt calibration and the 1 % FPR threshold, both fitted on the validation window."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import nn
from tqdm import tqdm

from training.fraud.data import Split
from training.fraud.metrics import TARGET_FPR
from training.fraud.model import MLP, DerivedFeatures, FraudScorer, fit_platt, threshold_for_fpr

TORCH_THREADS = 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and early-stopping settings."""

    max_epochs: int = 40
    patience: int = 5
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-5
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    pos_weight_power: float = 0.5  # positive weight = (negatives / positives) ** power


@dataclass(frozen=True)
class TrainResult:
    """The exportable scorer plus what happened while fitting it."""

    scorer: FraudScorer
    best_epoch: int
    pos_weight: float
    history: list[dict[str, float]]


@contextmanager
def deterministic_torch(seed: int) -> Iterator[None]:
    """Seed torch and pin its thread count and algorithms so a run is repeatable; the previous
    thread count and algorithm setting come back afterwards (other code shares the process)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (1 for constant columns), as float32."""
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def train_mlp(split: Split, config: TrainConfig, seed: int) -> TrainResult:
    """Fit the MLP on split.train, stop early on split.val and wrap it, calibrated, for export."""
    with deterministic_torch(seed):
        return _train(split, config, seed)


def _train(split: Split, config: TrainConfig, seed: int) -> TrainResult:
    n_features = split.train.features.shape[1]
    log_mask = np.array([name in split.train.log_scaled for name in split.train.feature_names])
    derive = DerivedFeatures(split.train.raw_names, split.train.recipe)
    net = MLP(n_features, config.hidden, config.dropout)
    zeros, ones = np.zeros(n_features), np.ones(n_features)
    unscaled = FraudScorer(derive, net, log_mask, zeros, ones, (1.0, 0.0))
    mean, std = standardisation(_normalise(unscaled, split.train.features).numpy())
    scorer = FraudScorer(derive, net, log_mask, mean, std, platt=(1.0, 0.0))
    x_train = _normalise(scorer, split.train.features)
    y_train = torch.as_tensor(split.train.labels, dtype=torch.float32).unsqueeze(1)
    x_val = _normalise(scorer, split.val.features)

    positives = float(split.train.labels.sum())
    imbalance = (len(split.train.labels) - positives) / max(positives, 1.0)
    pos_weight = imbalance**config.pos_weight_power
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)

    history: list[dict[str, float]] = []
    best_ap, best_epoch, best_state = -1.0, 0, copy.deepcopy(net.state_dict())
    epochs = tqdm(range(1, config.max_epochs + 1), desc="mlp", unit="epoch", disable=None)
    for epoch in epochs:
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        val_ap = float(average_precision_score(split.val.labels, _logits(net, x_val)))
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_ap": val_ap})
        epochs.set_postfix(loss=f"{total / len(order):.4f}", val_ap=f"{val_ap:.4f}")
        if val_ap > best_ap:
            best_ap, best_epoch, best_state = val_ap, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= config.patience:
            break

    net.load_state_dict(best_state)
    platt = fit_platt(_logits(net, x_val), split.val.labels)
    scorer = FraudScorer(derive, net, log_mask, mean, std, platt)
    val_scores = score(scorer, split.val.raw)[0]
    threshold = threshold_for_fpr(val_scores, split.val.labels, TARGET_FPR)
    scorer = FraudScorer(derive, net, log_mask, mean, std, platt, threshold).eval()
    return TrainResult(scorer, best_epoch, pos_weight, history)


def score(scorer: FraudScorer, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, decisions) of the exportable scorer on raw columns, as 1-D arrays."""
    scorer.eval()
    with torch.no_grad():
        probability, decision = scorer(torch.as_tensor(raw))
    return probability.numpy().ravel(), decision.numpy().ravel()


def _normalise(scorer: FraudScorer, features: np.ndarray) -> torch.Tensor:
    """Derived features -> network input, exactly as the exported graph computes it."""
    with torch.no_grad():
        return scorer.normalise(torch.as_tensor(features))


def _logits(net: MLP, x: torch.Tensor) -> np.ndarray:
    """Uncalibrated logits in eval mode, as a 1-D array."""
    net.eval()
    with torch.no_grad():
        return net(x).numpy().ravel()
