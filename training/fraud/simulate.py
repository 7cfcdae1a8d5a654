"""Seeded, vectorised credit-card transaction simulator.

Generative story, after Le Borgne et al., "Reproducible Machine Learning for Credit Card Fraud
Detection - Practical Handbook" (2022), chapter 3, with a card-testing scenario added:

1. Customers live at a home location drawn uniformly on a 100 x 100 grid. Each has spending
   habits: a mean amount ~ U(5, 100), a standard deviation of half the mean, and a mean number of
   transactions per day ~ U(0, 4) (20 % higher on weekends).
2. Terminals (merchants) sit at uniform locations and belong to a category (grocery, fuel,
   restaurant, retail, online, travel) that scales the amounts spent there. A customer uses the
   terminals within a radius of home (the nearest one if none is that close), picked uniformly.
3. Genuine transactions: per customer and day a Poisson number of transactions, time of day
   ~ N(12 h, 5.5 h) wrapped to the day, amount ~ N(mean, std) times the category factor (redrawn
   uniformly on (0, 2 * mean) when negative). Two kinds of legitimate noise keep the problem hard:
   1 % of purchases are occasional large buys (amount x U(3, 6)), and on 0.5 % of customer-days a
   customer makes a short run of 3-6 small purchases (transit, vending) within an hour.
4. Fraud scenarios, each a Poisson number of new incidents per day scaled to the population:
   - compromised terminal: every transaction at the terminal is fraudulent for the next
     U{14..28} days (skimmer, breached merchant);
   - compromised card: for the next 14 days a third of the customer's transactions are fraudulent
     with amounts multiplied by U(3, 6) (the fraudster spends big);
   - card testing: 5-20 small transactions (0.5-3.0) within about half an hour, mostly at night,
     at one or two remote, mostly online terminals, followed in 70 % of cases by a large cash-out.
   With the default rates about 0.6-0.8 % of transactions are fraudulent.

Timestamps are integer seconds from the start (day 0 is a Monday, 00:00). Amounts are rounded to
cents. The same seed always yields the same transactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAY = 86_400
CATEGORIES = ("grocery", "fuel", "restaurant", "retail", "online", "travel")
CATEGORY_PROBS = np.array([0.25, 0.15, 0.2, 0.2, 0.15, 0.05])
CATEGORY_AMOUNT_FACTOR = np.array([0.7, 0.9, 0.6, 1.3, 1.0, 2.5])
ONLINE = CATEGORIES.index("online")

GENUINE, COMPROMISED_TERMINAL, COMPROMISED_CARD, CARD_TESTING = range(4)
SCENARIOS = ("genuine", "compromised_terminal", "compromised_card", "card_testing")


@dataclass(frozen=True)
class SimConfig:
    """Population size, time span and fraud incident rates of one simulation."""

    n_customers: int = 4_000
    n_terminals: int = 8_000
    n_days: int = 120
    radius: float = 5.0
    terminal_compromises_per_10k_terminals_day: float = 1.5
    card_compromises_per_5k_customers_day: float = 2.5
    card_tests_per_5k_customers_day: float = 1.5


@dataclass(frozen=True)
class Transactions:
    """Transactions sorted by time; `scenario` is one of SCENARIOS' indices (0 = genuine)."""

    time: np.ndarray  # int64 seconds since day 0, 00:00 (a Monday)
    customer: np.ndarray  # int64
    terminal: np.ndarray  # int64
    amount: np.ndarray  # float64, rounded to cents
    scenario: np.ndarray  # int8

    @property
    def label(self) -> np.ndarray:
        """1 for fraud, 0 for genuine (int8)."""
        return (self.scenario != GENUINE).astype(np.int8)

    def __len__(self) -> int:
        return len(self.time)


def simulate(config: SimConfig, seed: int) -> Transactions:
    """Generate the transactions of `config.n_days` days; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    c = config.n_customers
    home = rng.uniform(0, 100, size=(c, 2))
    mean_amount = rng.uniform(5, 100, size=c)
    tx_per_day = rng.uniform(0, 4, size=c)
    terminal_xy = rng.uniform(0, 100, size=(config.n_terminals, 2))
    category = rng.choice(len(CATEGORIES), size=config.n_terminals, p=CATEGORY_PROBS)
    indptr, nearby = _nearby_terminals(home, terminal_xy, config.radius)

    genuine = _genuine(rng, config, mean_amount, tx_per_day, indptr, nearby, category)
    time, customer, terminal, amount, scenario = _stack(
        genuine, _micro_runs(rng, config, indptr, nearby)
    )
    _compromise_terminals(rng, config, time, terminal, scenario)
    _compromise_cards(rng, config, time, customer, amount, scenario)
    time, customer, terminal, amount, scenario = _stack(
        (time, customer, terminal, amount, scenario),
        _card_testing(rng, config, mean_amount, category),
    )
    order = np.lexsort((terminal, customer, time))
    return Transactions(
        time=time[order],
        customer=customer[order],
        terminal=terminal[order],
        amount=np.round(amount[order], 2),
        scenario=scenario[order],
    )


def _stack(*parts: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Concatenate column tuples (time, customer, terminal, amount, scenario) row-wise."""
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _nearby_terminals(
    home: np.ndarray, terminal_xy: np.ndarray, radius: float, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists of the terminals within `radius` of each home (the nearest one if none)."""
    counts, lists = [], []
    for start in range(0, len(home), chunk):
        d2 = ((home[start : start + chunk, None, :] - terminal_xy[None, :, :]) ** 2).sum(-1)
        close = d2 < radius**2
        empty = ~close.any(axis=1)
        close[empty, d2[empty].argmin(axis=1)] = True
        rows, cols = np.nonzero(close)
        counts.append(np.bincount(rows, minlength=len(close)))
        lists.append(cols)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    return indptr, np.concatenate(lists)


def _pick_terminal(
    rng: np.random.Generator, customer: np.ndarray, indptr: np.ndarray, nearby: np.ndarray
) -> np.ndarray:
    """A uniformly chosen nearby terminal for every transaction of `customer`."""
    n_near = indptr[customer + 1] - indptr[customer]
    offset = np.floor(rng.random(len(customer)) * n_near).astype(np.int64)
    return nearby[indptr[customer] + offset]


def _genuine(
    rng: np.random.Generator,
    config: SimConfig,
    mean_amount: np.ndarray,
    tx_per_day: np.ndarray,
    indptr: np.ndarray,
    nearby: np.ndarray,
    category: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Everyday purchases: Poisson counts per customer-day, daytime-centred, habitual amounts."""
    c, d = config.n_customers, config.n_days
    weekend = (np.arange(d) % 7) >= 5
    rate = tx_per_day[:, None] * np.where(weekend, 1.2, 1.0)[None, :]
    counts = rng.poisson(rate).ravel()
    cell = np.repeat(np.arange(c * d), counts)
    customer, day = cell // d, cell % d
    n = len(cell)
    time_of_day = np.mod(rng.normal(DAY / 2, 5.5 * 3600, size=n), DAY).astype(np.int64)
    terminal = _pick_terminal(rng, customer, indptr, nearby)
    mean = mean_amount[customer]
    amount = rng.normal(mean, mean / 2)
    negative = amount <= 0
    amount[negative] = rng.uniform(0, 2 * mean[negative])
    amount *= CATEGORY_AMOUNT_FACTOR[category[terminal]]
    big = rng.random(n) < 0.01
    amount[big] *= rng.uniform(3, 6, size=big.sum())
    time = day * DAY + time_of_day
    return time, customer, terminal, np.maximum(amount, 0.01), np.zeros(n, np.int8)


def _micro_runs(
    rng: np.random.Generator, config: SimConfig, indptr: np.ndarray, nearby: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Legitimate short runs of small purchases that resemble card testing."""
    c, d = config.n_customers, config.n_days
    runs = np.flatnonzero(rng.random(c * d) < 0.005)
    size = rng.integers(3, 7, size=len(runs))
    cell = np.repeat(runs, size)
    customer, day = cell // d, cell % d
    start = rng.integers(6 * 3600, 22 * 3600, size=len(runs))
    time = day * DAY + np.repeat(start, size) + rng.integers(0, 3600, size=len(cell))
    terminal = _pick_terminal(rng, customer, indptr, nearby)
    amount = rng.uniform(1.0, 6.0, size=len(cell))
    return time, customer, terminal, amount, np.zeros(len(cell), np.int8)


def _incidents(rng: np.random.Generator, per_day: float, n_days: int) -> np.ndarray:
    """Start day of each fraud incident: a Poisson number per day."""
    return np.repeat(np.arange(n_days), rng.poisson(per_day, size=n_days))


def _mark_windows(
    owner: np.ndarray, time: np.ndarray, who: np.ndarray, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Indices of the transactions of owner `who[k]` with `start[k] <= time < end[k]`, any k."""
    span = int(time.max()) + 1
    order = np.argsort(owner * span + time, kind="stable")
    keys = (owner * span + time)[order]
    lo = np.searchsorted(keys, who * span + start, "left")
    hi = np.searchsorted(keys, who * span + np.minimum(end, span), "left")
    hits = [order[a:b] for a, b in zip(lo, hi, strict=True)]
    return np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64)


def _compromise_terminals(
    rng: np.random.Generator,
    config: SimConfig,
    time: np.ndarray,
    terminal: np.ndarray,
    scenario: np.ndarray,
) -> None:
    """Mark every transaction at a compromised terminal, during its compromise, as fraud."""
    per_day = config.terminal_compromises_per_10k_terminals_day * config.n_terminals / 10_000
    day = _incidents(rng, per_day, config.n_days)
    who = rng.integers(0, config.n_terminals, size=len(day))
    start = day * DAY + rng.integers(0, DAY, size=len(day))
    end = start + rng.integers(14, 29, size=len(day)) * DAY
    hit = _mark_windows(terminal, time, who, start, end)
    scenario[hit[scenario[hit] == GENUINE]] = COMPROMISED_TERMINAL


def _compromise_cards(
    rng: np.random.Generator,
    config: SimConfig,
    time: np.ndarray,
    customer: np.ndarray,
    amount: np.ndarray,
    scenario: np.ndarray,
) -> None:
    """Turn a third of a compromised card's next 14 days of transactions into big frauds."""
    per_day = config.card_compromises_per_5k_customers_day * config.n_customers / 5_000
    day = _incidents(rng, per_day, config.n_days)
    who = rng.integers(0, config.n_customers, size=len(day))
    start = day * DAY + rng.integers(0, DAY, size=len(day))
    hit = _mark_windows(customer, time, who, start, start + 14 * DAY)
    hit = hit[(scenario[hit] == GENUINE) & (rng.random(len(hit)) < 1 / 3)]
    amount[hit] *= rng.uniform(3, 6, size=len(hit))
    scenario[hit] = COMPROMISED_CARD


def _card_testing(
    rng: np.random.Generator, config: SimConfig, mean_amount: np.ndarray, category: np.ndarray
) -> tuple[np.ndarray, ...]:
    """New fraudulent bursts of tiny transactions, often followed by a large cash-out."""
    per_day = config.card_tests_per_5k_customers_day * config.n_customers / 5_000
    day = _incidents(rng, per_day, config.n_days)
    k = len(day)
    who = rng.integers(0, config.n_customers, size=k)
    night = rng.random(k) < 0.6
    start = day * DAY + np.where(
        night, rng.integers(0, 6 * 3600, size=k), rng.integers(0, DAY, size=k)
    )
    online = np.flatnonzero(category == ONLINE)
    venue = np.where(
        rng.random((k, 2)) < 0.8,
        rng.choice(online, size=(k, 2)),
        rng.integers(0, config.n_terminals, size=(k, 2)),
    )
    size = rng.integers(5, 21, size=k)
    burst = np.repeat(np.arange(k), size)
    gaps = rng.exponential(100.0, size=len(burst)).astype(np.int64) + 1
    elapsed = np.cumsum(gaps)
    first = np.repeat(np.cumsum(size) - size, size)
    offsets = elapsed - elapsed[first] + gaps[first]
    test_time = start[burst] + offsets
    test_terminal = venue[burst, rng.integers(0, 2, size=len(burst))]
    test_amount = rng.uniform(0.5, 3.0, size=len(burst))

    cash = np.flatnonzero(rng.random(k) < 0.7)
    last = np.cumsum(size)[cash] - 1
    cash_time = test_time[last] + rng.integers(60, 1800, size=len(cash))
    cash_amount = np.maximum(mean_amount[who[cash]] * rng.uniform(3, 8, size=len(cash)), 150.0)
    return (
        np.concatenate([test_time, cash_time]),
        np.concatenate([who[burst], who[cash]]),
        np.concatenate([test_terminal, venue[cash, 0]]),
        np.concatenate([test_amount, cash_amount]),
        np.full(len(burst) + len(cash), CARD_TESTING, np.int8),
    )
