"""Server CPU time per request at c=64 for each protocol: this checkout against another one.

Issue 15 asks for the server's CPU time per request at c=64 to be at least halved against the
code of its filing (7ed8682). CPU time per request moves with the phase of a shared VM by a
quarter or more, so the two trees are measured in alternation, in one run, with the peers'
settings (bench/peers.py: the fraud model, single rows, 100 us queue delay, two instances of
one thread) under the same loads: HTTP JSON with wrk, HTTP binary and gRPC with perf_analyzer.

    git worktree add /tmp/baseline 7ed8682
    python bench/cpu_per_request.py --tree /tmp/baseline --rounds 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from peers import JSON_BODY, measure, standard_loads, volley_repository
from serving import machine, volley_running

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="per wrk run")
    args = parser.parse_args()
    trees = [(str(args.tree), args.tree), ("this checkout", ROOT)]
    print(f"Machine: {machine()}")
    print(f"fraud, single rows, peers' settings, c=64, {args.seconds:g} s per wrk run\n")
    print("| tree | round | load | req/s | p50 ms | p99 ms | server CPU us/request |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for i, (name, tree) in enumerate(trees):
                repository = Path(tmp) / f"{round_}-{i}"
                fraud = volley_repository(ROOT / "models" / "fraud", repository)
                with volley_running(fraud, tree=tree) as volley:
                    loads = standard_loads(
                        volley.http, volley.grpc, JSON_BODY, args.seconds, "fraud"
                    )
                    at_64 = {load: run for load, run in loads.items() if load.endswith("c=64")}
                    for row in measure(name, volley.proc.pid, at_64, args.seconds):
                        print(
                            f"| {name} | {round_} | {row.load} | {row.rps:,.0f} | "
                            f"{row.p50_ms:.2f} | {row.p99_ms:.2f} | {row.cpu_us:.0f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
