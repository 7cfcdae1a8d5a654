"""Command line: `python -m training.fraud [--quick] [--data PATH] [--out DIR] [--seed N]`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from training.export import next_version
from training.fraud.card import MODEL_NAMES
from training.fraud.pipeline import RunOptions, run

DEFAULT_OUT = Path("models/fraud")
QUICK_OUT = Path("runs/quick/fraud")


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m training.fraud",
        description="Train the fraud MLP, compare it with baselines and export it for Volley.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small simulation and fewer epochs: well under a minute (used by the tests)",
    )
    parser.add_argument(
        "--data", type=Path, help="CSV in the public credit-card format (Time,V1..V28,Amount,Class)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"model folder (default: {DEFAULT_OUT}; with --quick: {QUICK_OUT}); the run writes "
        "the next version folder in it (1/, 2/, ...), never over an existing one",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, model and baselines")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (sys.argv[1:] when argv is None)."""
    return build_parser().parse_args(argv)


def format_table(metrics: dict) -> str:
    """Plain-text comparison of the models on the test window."""
    test = metrics["data"]["split"]["test"]
    point = metrics["mlp"]["test_operating_point"]
    rows = [f"{'model':<22}{'AP':>8}{'ROC-AUC':>10}{'recall@1%FPR':>14}"]
    rows += [
        f"{MODEL_NAMES[name]:<22}{m['average_precision']:>8.4f}{m['roc_auc']:>10.4f}"
        f"{m['recall_at_1pct_fpr']:>14.4f}"
        for name, m in metrics["models"].items()
    ]
    rows.append(
        f"test window: {test['rows']} transactions, base fraud rate {test['fraud_rate']:.3%}; "
        f"MLP at threshold {metrics['mlp']['threshold']:.4g}: FPR {point['fpr']:.3%}, "
        f"recall {point['recall']:.3f}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run one training; writes the model folder and prints the comparison table."""
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "training.fraud", *words])
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    options = RunOptions(
        out=out, seed=args.seed, quick=args.quick, data=args.data, command=command,
        version=next_version(out),
    )  # fmt: skip
    metrics = run(options)
    print(format_table(metrics))
    print(f"wrote {out}/config.yaml, {options.version}/model.onnx, metrics.json, README.md")
    return 0
