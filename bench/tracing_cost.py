"""What request tracing costs (Triton's trace extension, docs/tracing.md), on one server.

Volley serves the shipped fraud model with `--trace-config triton,file=...`; between loads the
trace settings are changed over HTTP (`POST /v2/trace/setting`), so every setting runs on the
same process: tracing off, `TIMESTAMPS` one request in 1000 (Triton's default rate),
`TIMESTAMPS` every request, and `TIMESTAMPS` + `TENSORS` every request. Each round runs every
setting in turn, starting at the next one each round (this VM's speed drifts within minutes:
compare within a round), under `wrk` (single-row v2 JSON, c=64) and `perf_analyzer` (gRPC,
c=64). The in-process ONNX Runtime ceiling is measured in the same run.

    python bench/tracing_cost.py                  # 4 rounds, 6 s per load
    python bench/tracing_cost.py --rounds 5 --seconds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from peers import JSON_BODY, WRK_JSON, tree_cpu_seconds, wrk
from serving import ceiling, machine, perf_analyzer, start_volley, stop

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "off": {"trace_level": ["OFF"]},
    "TIMESTAMPS, rate 1000": {"trace_level": ["TIMESTAMPS"], "trace_rate": "1000"},
    "TIMESTAMPS, rate 1": {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"},
    "TIMESTAMPS + TENSORS, rate 1": {"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "1"},
}


def measure(volley, load: str, seconds: float) -> tuple[float, float, float, float]:
    """req/s, p50 ms, p99 ms and server CPU us per request of one load."""
    before, started = tree_cpu_seconds(volley.proc.pid), time.perf_counter()
    if load == WRK_JSON:
        rps, p50, p99 = wrk(f"http://{volley.http}/v2/models/fraud/infer", JSON_BODY, seconds)
    else:
        rps, p50, p99 = perf_analyzer("fraud", volley.grpc, "grpc", 64, [], seconds / 3)
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_seconds(volley.proc.pid) - before
    return rps, p50, p99, cpu / max(rps * elapsed, 1) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()

    print(machine(), file=sys.stderr)
    ceiling_row = ceiling(ROOT / "models" / "fraud" / "1" / "model.onnx", 3)[0]
    loads = [WRK_JSON, "gRPC, perf_analyzer c=64"]
    results: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory(prefix="volley-trace-") as tmp:
        trace_file = Path(tmp) / "trace.json"
        only_fraud = ("--model-control", "explicit", "--load-model", "fraud")
        volley = start_volley(ROOT / "models", *only_fraud,
                              "--trace-config", f"triton,file={trace_file}")  # fmt: skip
        try:
            wrk(f"http://{volley.http}/v2/models/fraud/infer", JSON_BODY, 3)  # warm-up, not kept
            names = list(SETTINGS)
            for round_number in range(args.rounds):
                # Each round starts at another setting: what comes first, or right after the
                # heaviest writing, is not always the same setting.
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:
                    settings = SETTINGS[name]
                    url = f"http://{volley.http}/v2/trace/setting"
                    requests.post(url, json=settings, timeout=10).raise_for_status()
                    for load in loads:
                        row = measure(volley, load, args.seconds)
                        results.setdefault((name, load), []).append(row)
                        print(f"  round {round_number + 1}, {name}, {load}: "
                              f"{row[0]:,.0f} req/s, p99 {row[2]:.2f} ms, {row[3]:.0f} us CPU",
                              file=sys.stderr, flush=True)  # fmt: skip
        finally:
            stop(volley.proc)
        written_mb = trace_file.stat().st_size / 1e6 if trace_file.exists() else 0.0

    print(f"\nMachine: {machine()}\n")
    print(
        f"in-process ORT ceiling: {ceiling_row.rps:,.0f} calls/s, p50 {ceiling_row.p50_ms:.3f} ms"
    )
    print(f"\nmedian of {args.rounds} alternated rounds, {args.seconds:.0f} s per load; "
          f"trace file written: {written_mb:,.0f} MB\n")  # fmt: skip
    print("| tracing | load | req/s | vs off | p50 ms | p99 ms | server CPU us/request |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for load in loads:
        off = statistics.median(r[0] for r in results[("off", load)])
        for name in SETTINGS:
            rows = results[(name, load)]
            rps = statistics.median(r[0] for r in rows)
            p50 = statistics.median(r[1] for r in rows)
            p99 = statistics.median(r[2] for r in rows)
            cpu = statistics.median(r[3] for r in rows)
            print(f"| {name} | {load} | {rps:,.0f} | {rps / off:.2f}x | {p50:.2f} | {p99:.2f} "
                  f"| {cpu:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
