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
    """Test-set fraud probabilities of LightGBM early-stopped on validation AP, and its tree count."""
    model = lgb.LGBMClassifier(
        n_estimators=max_trees,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=50,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        random_state=seed,
        deterministic=True,
        force_row_wise=True,
        n_jobs=LGBM_THREADS,
        metric="average_precision",
        verbose=-1,
    )
    model.fit(
        split.train.features,
        split.train.labels,
        eval_set=[(split.val.features, split.val.labels)],
        callbacks=[lgb.early_stopping(50, first_metric_only=True, verbose=False)],
    )
    best = int(model.best_iteration_) or max_trees
    return model.predict_proba(split.test.features, num_iteration=best)[:, 1], best

