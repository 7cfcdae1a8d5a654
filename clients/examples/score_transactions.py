"""Score two card transactions with the `fraud` model, raw columns given by name.

python clients/examples/score_transactions.py --url localhost:8001
"""

from __future__ import annotations

import argparse

from clients import VolleyClient


def transaction(
    amount: float, hour: float, mean_30d: float, count_1h: int, gap_s: float, risk: float
) -> dict[str, float]:
    """One transaction's raw columns, as a payment system knows them (any key order: the SDK
    reorders). No log or ratio here: the model computes its derived features itself."""
    return {
        "amount": amount,
        "hour_of_day": hour,
        "is_weekend": 0.0,
        "customer_count_1d": 2 + count_1h,
        "customer_count_7d": 9 + count_1h,
        "customer_count_30d": 38 + count_1h,
        "customer_mean_amount_1d": mean_30d,
        "customer_mean_amount_7d": mean_30d,
        "customer_mean_amount_30d": mean_30d,
        "customer_count_1h": count_1h,
        "seconds_since_previous": gap_s,
        "terminal_count_1d": 25,
        "terminal_count_7d": 170,
        "terminal_count_30d": 720,
        "terminal_risk_1d": risk,
        "terminal_risk_7d": risk,
        "terminal_risk_30d": risk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="host:port (gRPC) or http://...")
    args = parser.parse_args()
    transactions = {
        "groceries at noon": transaction(42.0, 12.5, 55.0, 0, 86_400, 0.0),
        "burst at 3 a.m., risky terminal": transaction(980.0, 3.2, 40.0, 6, 25, 0.6),
    }
    with VolleyClient(args.url) as client:
        result = client.score(list(transactions.values()))
    print(f"threshold {result.threshold:.4f}")
    for name, score, flagged in zip(transactions, result.scores, result.decisions, strict=True):
        print(f"{name:<34} score {score:.4f}  {'FRAUD' if flagged else 'ok'}")


if __name__ == "__main__":
    main()
