"""Reference models on the same split: logistic regression and gradient-boosted trees."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training.fraud.data import Split

LGBM_THREADS = 2


def logistic_regression(split: Split, seed: int) -> np.ndarray:
    """Test-set fraud probabilities of a class-balanced, standardised logistic regression."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed),
    )
    model.fit(split.train.features, split.train.labels)
    return model.predict_proba(split.test.features)[:, 1]


def lightgbm(split: Split, seed: int, max_trees: int = 600) -> tuple[np.ndarray, int]:
    """Test-set fraud probabilities of LightGBM early-stopped on validation AP; its tree count."""
    params = {
        "objective": "binary",
        "metric": "average_precision",
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 50,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "feature_fraction": 0.8,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": LGBM_THREADS,
        "verbosity": -1,
    }
    train = lgb.Dataset(split.train.features, split.train.labels)
    val = lgb.Dataset(split.val.features, split.val.labels, reference=train)
    booster = lgb.train(
        params,
        train,
        num_boost_round=max_trees,
        valid_sets=[val],
        callbacks=[lgb.early_stopping(50, verbose=False)],
    )
    trees = booster.best_iteration or max_trees
    return booster.predict(split.test.features, num_iteration=trees), trees
