"""Training data: simulated transactions or the public credit-card CSV, split by time."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from training.fraud.features import (
    FEATURES,
    LOG_SCALED,
    RAW_FEATURES,
    RECIPE,
    Derived,
    Recipe,
    build_features,
    raw_columns,
)
from training.fraud.simulate import DAY, SimConfig, simulate

PCA_COLUMNS = tuple(f"V{i}" for i in range(1, 29))
CSV_RAW: dict[str, str] = {
    **{
        name: f"PCA component {name} of the original (confidential) features"
        for name in PCA_COLUMNS
    },
    "Amount": "transaction amount in currency units, not negative",
}
CSV_FEATURES: dict[str, str] = {
    **{name: CSV_RAW[name] for name in PCA_COLUMNS},
    "amount": "transaction amount",
    "log_amount": "log(1 + amount)",
}
CSV_RECIPE: Recipe = {
    **{name: name for name in PCA_COLUMNS},
    "amount": "Amount",
    "log_amount": Derived("log1p", ("Amount",)),
}


@dataclass(frozen=True)
class Dataset:
    """Raw columns (the graph's input), the network's features, labels and timestamps (seconds),
    rows in time order.

    `features` holds the derived columns as the numpy reference computes them (in float64, then
    rounded); the network trains on them, and the exported graph computes the same columns from
    `raw` in float32 (equal up to float32 rounding), so its quality is measured on `raw`.
    """

    raw: np.ndarray  # float32 [n, R]
    features: np.ndarray  # float32 [n, F]
    labels: np.ndarray  # int8 [n]
    time: np.ndarray  # [n]
    raw_docs: dict[str, str]  # raw column name -> meaning and units, in graph input order
    feature_docs: dict[str, str]  # network feature name -> meaning, in network order
    recipe: Recipe  # network feature name -> raw column or its in-graph derivation
    log_scaled: frozenset[str]  # heavy-tailed, non-negative features the model log-compresses
    source: str

    @property
    def raw_names(self) -> tuple[str, ...]:
        """Column names of `raw`: the model's `feature_names`."""
        return tuple(self.raw_docs)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Column names of `features`."""
        return tuple(self.feature_docs)

    def rows(self, mask: np.ndarray) -> Dataset:
        """The subset of rows selected by a boolean mask."""
        return replace(
            self,
            raw=self.raw[mask],
            features=self.features[mask],
            labels=self.labels[mask],
            time=self.time[mask],
        )


@dataclass(frozen=True)
class Split:
    """Train, validation and test sets; every train time < every val time < every test time."""

    train: Dataset
    val: Dataset
    test: Dataset

    def summary(self) -> dict[str, dict[str, float]]:
        """Row count, fraud count, fraud rate and time range of each part."""
        return {
            name: {
                "rows": len(part.labels),
                "frauds": int(part.labels.sum()),
                "fraud_rate": float(part.labels.mean()),
                "time_start": float(part.time.min()),
                "time_end": float(part.time.max()),
            }
            for name, part in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def split_by_time(data: Dataset, val_start: float, test_start: float, start: float = 0) -> Split:
    """Rows in [start, val_start) train, [val_start, test_start) validate, the rest test."""
    return Split(
        train=data.rows((data.time >= start) & (data.time < val_start)),
        val=data.rows((data.time >= val_start) & (data.time < test_start)),
        test=data.rows(data.time >= test_start),
    )


def simulated_split(config: SimConfig, seed: int, burn_in_days: int) -> Split:
    """Simulate, featurise and split: after a burn-in that fills the rolling windows, the
    remaining days go 60 / 20 / 20 % (whole days) to train / val / test."""
    tx = simulate(config, seed)
    data = Dataset(
        raw=raw_columns(tx),
        features=build_features(tx),
        labels=tx.label,
        time=tx.time,
        raw_docs=RAW_FEATURES,
        feature_docs=FEATURES,
        recipe=RECIPE,
        log_scaled=LOG_SCALED,
        source=f"simulator(seed={seed})",
    )
    usable = config.n_days - burn_in_days
    val_day = burn_in_days + round(0.6 * usable)
    test_day = burn_in_days + round(0.8 * usable)
    return split_by_time(data, val_day * DAY, test_day * DAY, burn_in_days * DAY)


def load_creditcard_csv(path: Path) -> Dataset:
    """Read the public credit-card fraud CSV (`Time, V1..V28, Amount, Class`; quotes allowed)."""
    with path.open(newline="") as handle:
        header = next(csv.reader(handle))
    column = {name.strip(): i for i, name in enumerate(header)}
    missing = [c for c in ("Time", *PCA_COLUMNS, "Amount", "Class") if c not in column]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    table = np.loadtxt(path, delimiter=",", skiprows=1, quotechar='"', ndmin=2)
    order = np.argsort(table[:, column["Time"]], kind="stable")
    table = table[order]
    raw = table[:, [column[c] for c in CSV_RAW]]
    amount = table[:, column["Amount"]]
    features = np.column_stack(
        [table[:, [column[c] for c in PCA_COLUMNS]], amount, np.log1p(amount)]
    )
    return Dataset(
        raw=raw.astype(np.float32),
        features=features.astype(np.float32),
        labels=table[:, column["Class"]].astype(np.int8),
        time=table[:, column["Time"]],
        raw_docs=CSV_RAW,
        feature_docs=CSV_FEATURES,
        recipe=CSV_RECIPE,
        log_scaled=frozenset({"amount"}),
        source=f"csv({path.name})",
    )


def csv_split(data: Dataset) -> Split:
    """Time-ordered 60 / 20 / 20 % split of a loaded CSV (cuts at Time quantiles)."""
    val_start, test_start = np.quantile(data.time, [0.6, 0.8])
    return split_by_time(data, val_start, test_start, start=float(data.time.min()))
