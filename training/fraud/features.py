"""Point-in-time features for simulated transactions, as a real-time scoring system computes them.

Every rolling aggregate looks strictly into the past: a window for a transaction at time t covers
[t - w, t) and so never holds the transaction itself (nor others of the same second). Fraud
labels are only known `LABEL_DELAY_DAYS` after the fact, so the terminal risk features use the
delayed window [t - delay - w, t - delay). Amounts are summed in integer cents, which keeps every
aggregate exact: changing a later transaction cannot perturb an earlier feature even by rounding.

`raw_columns` gives what a client sends the model (RAW_FEATURES, in graph order); the exported
graph derives the network's FEATURES from them as RECIPE says (log(1 + x), the night test, the
amount ratio, the 30-day cap), and `build_features` is the numpy reference of that derivation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.fraud.simulate import DAY, Transactions

HOUR = 3_600
LABEL_DELAY_DAYS = 7
WINDOWS_DAYS = (1, 7, 30)
NO_HISTORY_GAP = 30 * DAY

FEATURES: dict[str, str] = {
    "amount": "transaction amount (currency units)",
    "log_amount": "log(1 + amount)",
    "hour_of_day": "local time of day in hours, 0-24",
    "is_night": "1 if the transaction happens between 22:00 and 06:00, else 0",
    "is_weekend": "1 on Saturday or Sunday, else 0",
    **{
        f"customer_count_{w}d": f"number of the card's transactions in the previous {w} day(s)"
        for w in WINDOWS_DAYS
    },
    **{
        f"customer_mean_amount_{w}d": f"mean amount of the card's transactions in the previous "
        f"{w} day(s) (0 when there are none)"
        for w in WINDOWS_DAYS
    },
    "amount_to_customer_mean_30d": "amount / customer_mean_amount_30d (1 when no history)",
    "customer_count_1h": "number of the card's transactions in the previous hour (card testing)",
    "log_seconds_since_previous": "log(1 + seconds since the card's previous transaction), "
    "capped at 30 days",
    **{
        f"terminal_count_{w}d": f"number of transactions at the terminal in the previous {w} day(s)"
        for w in WINDOWS_DAYS
    },
    **{
        f"terminal_risk_{w}d": f"fraud rate at the terminal over the {w} day(s) ending "
        f"{LABEL_DELAY_DAYS} days ago (labels known only after that delay; 0 when no transactions)"
        for w in WINDOWS_DAYS
    },
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)
LOG_SCALED = frozenset(
    name
    for name in FEATURE_NAMES
    if name in ("amount", "amount_to_customer_mean_30d") or "count" in name or "mean_amount" in name
)


@dataclass(frozen=True)
class Derived:
    """How the exported graph computes one network feature from raw columns (float32).

    `op` is "log1p" (log(1 + x), negative x counted as 0), "is_night" (1 if x >= 22 or x < 6,
    else 0) or "ratio" (x / y, 1 where y <= 0: no history); `cap` first replaces x by min(x, cap).
    """

    op: str
    inputs: tuple[str, ...]
    cap: float | None = None

    def formula(self) -> str:
        """The computation in words, for model cards."""
        x = f"min({self.inputs[0]}, {self.cap:.10g})" if self.cap is not None else self.inputs[0]
        if self.op == "log1p":
            return f"log(1 + {x})"
        if self.op == "is_night":
            return f"1 if {x} >= 22 or {x} < 6, else 0"
        if self.op == "ratio":
            return f"{x} / {self.inputs[1]}, 1 when {self.inputs[1]} is 0 (no history)"
        raise ValueError(f"unknown derivation {self.op!r}")


# A network feature is a raw column (by name) or computed from raw columns in the graph.
Recipe = dict[str, str | Derived]

RAW_FEATURES: dict[str, str] = {
    "amount": "transaction amount in currency units (e.g. 42.5), not negative",
    "hour_of_day": "local time of day in hours, 0 <= h < 24 (14:30 is 14.5)",
    "is_weekend": "1 on Saturday or Sunday, else 0",
    **{
        f"customer_count_{w}d": f"number of the card's transactions in the {w} day(s) before this "
        "one (count)"
        for w in WINDOWS_DAYS
    },
    **{
        f"customer_mean_amount_{w}d": f"mean amount (currency units) of the card's transactions in "
        f"the {w} day(s) before this one; 0 when there are none"
        for w in WINDOWS_DAYS
    },
    "customer_count_1h": "number of the card's transactions in the hour before this one (count)",
    "seconds_since_previous": "seconds since the card's previous transaction; "
    f"{NO_HISTORY_GAP} (30 days) or more when there is none (capped at 30 days in the graph)",
    **{
        f"terminal_count_{w}d": f"number of transactions at the terminal in the {w} day(s) before "
        "this one (count)"
        for w in WINDOWS_DAYS
    },
    **{
        f"terminal_risk_{w}d": f"fraction (0-1) of fraudulent transactions at the terminal over "
        f"the {w} day(s) ending {LABEL_DELAY_DAYS} days ago (labels are known only after that "
        "delay); 0 when there were none"
        for w in WINDOWS_DAYS
    },
}
RAW_NAMES: tuple[str, ...] = tuple(RAW_FEATURES)
_DERIVED: dict[str, Derived] = {
    "log_amount": Derived("log1p", ("amount",)),
    "is_night": Derived("is_night", ("hour_of_day",)),
    "amount_to_customer_mean_30d": Derived("ratio", ("amount", "customer_mean_amount_30d")),
    "log_seconds_since_previous": Derived("log1p", ("seconds_since_previous",), NO_HISTORY_GAP),
}
RECIPE: Recipe = {name: _DERIVED.get(name, name) for name in FEATURE_NAMES}


class PastWindows:
    """Rolling aggregates over earlier transactions of the same group (customer or terminal)."""

    def __init__(self, group: np.ndarray, time: np.ndarray) -> None:
        self.order = np.lexsort((time, group))
        span = int(time.max() - time.min()) + (max(WINDOWS_DAYS) + LABEL_DELAY_DAYS) * DAY + 1
        self.group = group[self.order].astype(np.int64)
        self.time = time[self.order] - time.min()
        self.keys = self.group * span + self.time

    def _bounds(self, back: int, until: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted-order index range of the window [t - back, t - until) of every row."""
        lo = np.searchsorted(self.keys, self.keys - back, "left")
        hi = np.searchsorted(self.keys, self.keys - until, "left")
        return lo, hi

    def _restore(self, values: np.ndarray) -> np.ndarray:
        """Sorted order -> input order."""
        out = np.empty_like(values)
        out[self.order] = values
        return out

    def count(self, back: int, until: int = 0) -> np.ndarray:
        """Number of group transactions in [t - back, t - until), in input order."""
        lo, hi = self._bounds(back, until)
        return self._restore(hi - lo)

    def total(self, values: np.ndarray, back: int, until: int = 0) -> np.ndarray:
        """Sum of integer `values` (input order) over [t - back, t - until), in input order."""
        cumulative = np.concatenate([[0], np.cumsum(values[self.order], dtype=np.int64)])
        lo, hi = self._bounds(back, until)
        return self._restore(cumulative[hi] - cumulative[lo])

    def seconds_since_previous(self, cap: int) -> np.ndarray:
        """Seconds since the group's latest strictly earlier transaction, `cap` when none."""
        first_same_time = np.searchsorted(self.keys, self.keys, "left")
        previous = np.maximum(first_same_time - 1, 0)
        has_previous = (first_same_time > 0) & (self.group[previous] == self.group)
        gap = np.where(has_previous, self.time - self.time[previous], cap)
        return self._restore(np.minimum(gap, cap))


def raw_columns(tx: Transactions) -> np.ndarray:
    """The RAW_NAMES matrix the exported graph takes (float32, one row per transaction)."""
    columns = _columns(tx)
    return np.column_stack([columns[name] for name in RAW_NAMES]).astype(np.float32)


def build_features(tx: Transactions) -> np.ndarray:
    """The FEATURE_NAMES matrix, the network's input (float32, one row per transaction).

    The numpy reference of what the graph computes from `raw_columns(tx)` (RECIPE), equal to it
    up to float32 rounding of the derived columns.
    """
    columns = _columns(tx)
    return np.column_stack([columns[name] for name in FEATURE_NAMES]).astype(np.float32)


def _columns(tx: Transactions) -> dict[str, np.ndarray]:
    """Every raw and derived column by name (input order)."""
    cents = np.round(tx.amount * 100).astype(np.int64)
    label = tx.label.astype(np.int64)
    hour = (tx.time % DAY) / HOUR
    columns: dict[str, np.ndarray] = {
        "amount": tx.amount,
        "log_amount": np.log1p(tx.amount),
        "hour_of_day": hour,
        "is_night": (hour >= 22) | (hour < 6),
        "is_weekend": (tx.time // DAY) % 7 >= 5,
    }
    customer = PastWindows(tx.customer, tx.time)
    for w in WINDOWS_DAYS:
        count = customer.count(w * DAY)
        columns[f"customer_count_{w}d"] = count
        columns[f"customer_mean_amount_{w}d"] = _mean(customer.total(cents, w * DAY), count) / 100
    mean_30d = columns["customer_mean_amount_30d"]
    columns["amount_to_customer_mean_30d"] = tx.amount / np.where(mean_30d > 0, mean_30d, tx.amount)
    columns["customer_count_1h"] = customer.count(HOUR)
    columns["seconds_since_previous"] = customer.seconds_since_previous(NO_HISTORY_GAP)
    columns["log_seconds_since_previous"] = np.log1p(columns["seconds_since_previous"])

    terminal = PastWindows(tx.terminal, tx.time)
    delay = LABEL_DELAY_DAYS * DAY
    for w in WINDOWS_DAYS:
        columns[f"terminal_count_{w}d"] = terminal.count(w * DAY)
    for w in WINDOWS_DAYS:
        known = terminal.count(delay + w * DAY, delay)
        frauds = terminal.total(label, delay + w * DAY, delay)
        columns[f"terminal_risk_{w}d"] = _mean(frauds, known)
    return columns


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """total / count, 0 where count is 0."""
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)
