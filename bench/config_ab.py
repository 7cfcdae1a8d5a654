"""A/B of one change: the shipped config against the same with `--set` overrides and/or extra
server flags (`--flags`).

Both servers serve the same model folder (default: the shipped `fraud`), differing only in the
overridden config keys and the variant's extra `volley serve` flags; they are started in turn,
`--rounds` times, each measured under wrk (HTTP JSON, 64 connections, as in `bench/peers.py`)
and perf_analyzer (HTTP binary and gRPC at each `--concurrency`). On a VM whose speed drifts,
only alternated rounds compare; the table gives every round, the medians, and how many rounds
the variant won. The in-process ONNX Runtime ceiling (one row at a time) is measured in the same
run, at the start.

    python bench/config_ab.py --set inline_batches=true --rounds 5 --seconds 6 --concurrency 8 64
    python bench/config_ab.py --flags="--workers 2" --rounds 5 --seconds 6
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from peers import (
    JSON_BODY,
    Row,
    changed_repository,
    measure,
    perf_analyzer_loads,
    standard_loads,
)
from serving import BUSY_POLL_FLAGS, ceiling, machine, start_volley, stop

ROOT = Path(__file__).resolve().parents[1]


def override(text: str) -> tuple[str, object]:
    """`KEY=VALUE` with VALUE read as YAML (true, 100, [1, 2], ...)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def loads(http: str, grpc: str, model: str, seconds: float, concurrency: list[int]) -> dict:
    """The loads by name: wrk's HTTP JSON, then perf_analyzer's HTTP binary and gRPC at each
    concurrency (a JSON body for wrk only fits the fraud model's input)."""
    if model == "fraud":
        return standard_loads(http, grpc, JSON_BODY, seconds, model, tuple(concurrency))
    return perf_analyzer_loads(http, grpc, seconds, model, tuple(concurrency))


def measure_once(
    repo: Path, flags: list[str], name: str, model: str, args: argparse.Namespace
) -> list[Row]:
    """One server over `repo`, started with `flags`, under every load, then stopped."""
    volley = start_volley(repo, *BUSY_POLL_FLAGS[args.busy_poll], *flags)
    try:
        runs = loads(volley.http, volley.grpc, model, args.seconds, args.concurrency)
        return measure(name, volley.proc.pid, runs, args.seconds)
    finally:
        stop(volley.proc)


def report(rounds: list[dict[str, dict[str, Row]]], label: str) -> str:
    """Per load: each round's req/s and server CPU a request for both, medians, variant wins."""
    lines = [
        f"| load | config as it is: req/s (CPU us/request) | {label}: req/s (CPU us/request) "
        "| median req/s, as it is -> variant | variant ahead |",
        "|---|---|---|---|---|",
    ]
    for load in rounds[0]["shipped"]:
        base = [r["shipped"][load] for r in rounds]
        var = [r["variant"][load] for r in rounds]

        def cells(rows: list[Row]) -> str:
            return " / ".join(f"{r.rps:,.0f} ({r.cpu_us:.0f})" for r in rows)

        b, v = statistics.median(r.rps for r in base), statistics.median(r.rps for r in var)
        wins = sum(y.rps > x.rps for x, y in zip(base, var, strict=True))
        lines.append(
            f"| {load} | {cells(base)} | {cells(var)} | {b:,.0f} -> {v:,.0f} "
            f"({v / b - 1:+.0%}) | {wins} of {len(rounds)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "fraud")
    parser.add_argument(
        "--set", type=override, action="append", default=[], dest="changes",
        metavar="KEY=VALUE", help="a config key of the variant (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--flags", type=shlex.split, default=[], help="extra `volley serve` flags of the variant"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="per load and server")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[64], help="perf_analyzer's concurrencies"
    )
    parser.add_argument("--busy-poll", choices=sorted(BUSY_POLL_FLAGS), default="default")
    args = parser.parse_args()
    changes = dict(args.changes)
    if not changes and not args.flags:
        parser.error("give the variant at least one --set or --flags")
    label = ", ".join(
        [f"{k}: {v}" for k, v in changes.items()] + [shlex.join(args.flags)] * bool(args.flags)
    )
    model = args.model_dir.name
    model_file = args.model_dir / "1" / "model.onnx"
    (ceiling_row,) = ceiling(model_file, 3.0)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            "shipped": (changed_repository(args.model_dir, Path(tmp) / "shipped", {}), []),
            "variant": (
                changed_repository(args.model_dir, Path(tmp) / "variant", changes),
                args.flags,
            ),
        }
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            rounds.append(
                {
                    side: {
                        r.load: r for r in measure_once(repo, flags, f"Volley, {side}", model, args)
                    }
                    for side, (repo, flags) in sides.items()
                }
            )
    print(f"Machine: {machine()}")
    print(
        f"{model}, single-row requests, {args.seconds:g} s per load, the two servers in turn "
        f"{args.rounds} times; in-process ONNX Runtime ceiling: {ceiling_row.rps:,.0f} req/s "
        f"one at a time, p50 {ceiling_row.p50_ms:.3f} ms"
    )
    print()
    print(report(rounds, label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
