"""One training run end to end: data, MLP, baselines, ONNX export and the model folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.export import OPSET, check_parity, export_onnx
from training.fraud.artifacts import onnx_metadata, threshold_text, write_model_folder
from training.fraud.baselines import lightgbm, logistic_regression
from training.fraud.card import render_card
from training.fraud.data import Split, csv_split, load_creditcard_csv, simulated_split
from training.fraud.features import Derived
from training.fraud.metrics import TARGET_FPR, calibration, operating_point, ranking_metrics
from training.fraud.model import FraudScorer
from training.fraud.simulate import SimConfig
from training.fraud.train import TrainConfig, TrainResult, deterministic_torch, score, train_mlp

PARITY_BATCH_SIZES = (1, 7, 64, 1024)


@dataclass(frozen=True)
class RunOptions:
    """What the command line asked for."""

    out: Path
    seed: int = 0
    quick: bool = False
    data: Path | None = None
    command: str = "python -m training.fraud"
    version: int = 1  # the version folder the ONNX file goes to


@dataclass(frozen=True)
class Recipe:
    """Simulation size, burn-in and optimiser settings of one run mode."""

    sim: SimConfig
    burn_in_days: int
    train: TrainConfig


FULL = Recipe(SimConfig(), burn_in_days=30, train=TrainConfig())
QUICK = Recipe(
    SimConfig(n_customers=1_500, n_terminals=3_000, n_days=80),
    burn_in_days=21,
    train=TrainConfig(max_epochs=15, patience=4, batch_size=1024),
)


def load_split(options: RunOptions, recipe: Recipe) -> Split:
    """The public-format CSV when --data is given, else a fresh simulation."""
    if options.data is not None:
        return csv_split(load_creditcard_csv(options.data))
    return simulated_split(recipe.sim, options.seed, recipe.burn_in_days)


def run(options: RunOptions) -> dict:
    """Train, evaluate, export and write the model folder; returns the metrics written."""
    with deterministic_torch(options.seed):
        return _run(options)


def _run(options: RunOptions) -> dict:
    recipe = QUICK if options.quick else FULL
    split = load_split(options, recipe)
    result = train_mlp(split, recipe.train, options.seed)
    threshold = float(result.scorer.threshold)
    test = split.test
    mlp_scores, mlp_decisions = score(result.scorer, test.raw)
    gbm_scores, trees = lightgbm(split, options.seed)
    models = {
        "mlp": ranking_metrics(test.labels, mlp_scores),
        "logistic_regression": ranking_metrics(
            test.labels, logistic_regression(split, options.seed)
        ),
        "lightgbm": ranking_metrics(test.labels, gbm_scores),
    }
    parity = _export(result.scorer, split, options)
    val_decisions = score(result.scorer, split.val.raw)[1]
    metrics = {
        "data": {
            "source": test.source,
            "n_features": len(test.raw_names),
            "feature_names": list(test.raw_names),
            "network_features": list(test.feature_names),
            "derived_features": {
                name: how.formula() for name, how in test.recipe.items() if isinstance(how, Derived)
            },
            "split": split.summary(),
        },
        "models": models,
        "mlp": {
            **_describe(result, recipe.train),
            "threshold": float(threshold_text(threshold)),
            "target_fpr": TARGET_FPR,
            "val_operating_point": operating_point(split.val.labels, val_decisions),
            "test_operating_point": operating_point(test.labels, mlp_decisions),
            "test_calibration": calibration(test.labels, mlp_scores),
        },
        "lightgbm": {"trees": trees},
        "export": {
            "opset": OPSET,
            "parity_batch_sizes": list(PARITY_BATCH_SIZES),
            "parity_max_rel_diff": parity,
        },
        "run": {"seed": options.seed, "quick": options.quick, "command": options.command},
    }
    write_model_folder(options.out, threshold, TARGET_FPR, test.raw_names, metrics)
    (options.out / "README.md").write_text(render_card(metrics, test))
    return metrics


def _describe(result: TrainResult, config: TrainConfig) -> dict:
    """Training settings and outcome of the MLP, for metrics.json and the card."""
    return {
        **asdict(config),
        "best_epoch": result.best_epoch,
        "pos_weight": result.pos_weight,
        "platt": [float(result.scorer.platt_a), float(result.scorer.platt_b)],
        "history": result.history,
    }


def _export(scorer: FraudScorer, split: Split, options: RunOptions) -> float:
    """Write out/<version>/model.onnx, check it against PyTorch on fresh inputs; max rel. diff."""
    path = options.out / str(options.version) / "model.onnx"
    metadata = onnx_metadata(
        float(scorer.threshold),
        TARGET_FPR,
        split.train.raw_names,
        {
            "calibration": "platt",
            "training_data": split.train.source,
            "seed": str(options.seed),
            "command": options.command,
        },
    )
    example = torch.as_tensor(split.val.raw[:2])
    export_onnx(scorer, example, path, "features", ("score", "is_fraud"), metadata)
    rows = split.val.raw
    rng = np.random.default_rng(options.seed + 1)

    def fresh_input(batch: int) -> torch.Tensor:
        """Random validation rows (raw columns), each value jittered by about 5 %."""
        picked = rows[rng.integers(0, len(rows), size=batch)]
        return torch.as_tensor(picked * rng.normal(1.0, 0.05, size=picked.shape).astype(np.float32))

    return check_parity(scorer, path, fresh_input, PARITY_BATCH_SIZES)
