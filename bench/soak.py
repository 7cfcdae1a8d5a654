"""Soak benchmark: ten minutes of mixed load at about 70 % of capacity, and nothing degrades.

Capacity is measured first (perf_analyzer, fraud, single rows, concurrency 16, HTTP and gRPC
each alone). The soak then runs, in rounds of a minute: fraud over HTTP at 30 % of the HTTP
capacity and over gRPC at 30 % of the gRPC capacity (perf_analyzer in request-rate mode, open
loop), and one 30 FPS camera (640x480 JPEG frames on a gRPC stream to `detect`), all at once.
Each round records throughput, p99 per workload, errors, and the server's RSS.

    python bench/soak.py                      # 10 rounds of 60 s
    python bench/soak.py --rounds 3 --seconds 30

Targets: no error; RSS at the end within 5 % of RSS after the first round; the last round's
p99 within 1.5x the first round's, per workload. The load generators share the machine.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from serving import PERF_ANALYZER, machine, perf_analyzer, rss_mb, start_volley, stop
from vision import StreamLog, camera, camera_frames

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Round:
    index: int
    http_rps: float
    http_p99: float
    grpc_rps: float
    grpc_p99: float
    camera_fps: float
    camera_p99: float
    camera_skipped: int
    errors: int
    rss_mb: float

    def row(self) -> str:
        return (
            f"| {self.index} | {self.http_rps:.0f} | {self.http_p99:.2f} | {self.grpc_rps:.0f} | "
            f"{self.grpc_p99:.2f} | {self.camera_fps:.1f} | {self.camera_p99:.1f} | "
            f"{self.camera_skipped} | {self.errors} | {self.rss_mb:.0f} |"
        )


def at_rate(url: str, protocol: str, rate: float, seconds: float) -> tuple[float, float, int]:
    """perf_analyzer at a fixed request rate for `seconds` (three windows): req/s, p99 ms, and
    1 when it reported an error (it stops on the first failed request)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [
            *PERF_ANALYZER, "-m", "fraud", "-u", url, "-i", protocol,
            "--request-rate-range", str(int(rate)),
            "--measurement-interval", str(int(seconds * 1000 / 3)),
            "--max-trials", "3", "--stability-percentage", "999",
            "--percentile", "99", "-f", str(out),
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 3 + 120)
        if run.returncode != 0 or not out.exists():
            print(run.stdout[-1500:], run.stderr[-1500:], file=sys.stderr)
            return 0.0, float("nan"), 1
        with out.open() as f:
            row = next(csv.DictReader(f))
    return float(row["Inferences/Second"]), float(row["p99 latency"]) / 1000, 0


def soak_round(index: int, http: str, grpc: str, rates: tuple[float, float], frames: list[bytes],
               seconds: float, pid: int) -> Round:  # fmt: skip
    log = StreamLog()
    cam = threading.Thread(target=camera, args=(grpc, frames, f"r{index}", seconds, log))
    cam.start()
    with ThreadPoolExecutor(2) as pool:
        http_run = pool.submit(at_rate, http, "http", rates[0], seconds)
        grpc_run = pool.submit(at_rate, grpc, "grpc", rates[1], seconds)
        (http_rps, http_p99, http_err), (grpc_rps, grpc_p99, grpc_err) = (
            http_run.result(),
            grpc_run.result(),
        )
    cam.join()
    answered = len(log.latency_ms) + log.skipped + log.errors
    lost = len(log.sent) - answered
    p99 = float(np.percentile(log.latency_ms, 99)) if log.latency_ms else float("nan")
    return Round(
        index, http_rps, http_p99, grpc_rps, grpc_p99, len(log.latency_ms) / seconds, p99,
        log.skipped, http_err + grpc_err + log.errors + lost, rss_mb(pid),
    )  # fmt: skip


def report(capacity: tuple, rates: tuple, rounds: list[Round], seconds: float) -> str:
    first, last = rounds[0], rounds[-1]
    growth = (last.rss_mb - first.rss_mb) / first.rss_mb * 100
    errors = sum(r.errors for r in rounds)

    def stable(a: float, b: float) -> str:
        return "yes" if b <= 1.5 * a else "NO"

    lines = [
        f"Machine: {machine()}",
        f"Capacity alone (perf_analyzer, c=16): HTTP {capacity[0]:.0f} req/s, gRPC "
        f"{capacity[1]:.0f} req/s. Soak load: HTTP {rates[0]:.0f} + gRPC {rates[1]:.0f} req/s "
        f"(fraud, open loop) + one 30 FPS camera (detect), {len(rounds)} rounds of {seconds:g} s",
        "",
        "| round | HTTP req/s | HTTP p99 ms | gRPC req/s | gRPC p99 ms | camera FPS | "
        "camera p99 ms | frames skipped | errors | server RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in rounds),
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| no error | {errors} | {'yes' if errors == 0 else 'NO'} |",
        f"| RSS growth under 5 % | {growth:+.1f} % ({first.rss_mb:.0f} -> {last.rss_mb:.0f} MB)"
        f" | {'yes' if growth < 5 else 'NO'} |",
        f"| HTTP p99 stable (last <= 1.5x first) | {first.http_p99:.2f} -> {last.http_p99:.2f} ms"
        f" | {stable(first.http_p99, last.http_p99)} |",
        f"| gRPC p99 stable | {first.grpc_p99:.2f} -> {last.grpc_p99:.2f} ms | "
        f"{stable(first.grpc_p99, last.grpc_p99)} |",
        f"| camera p99 stable | {first.camera_p99:.1f} -> {last.camera_p99:.1f} ms | "
        f"{stable(first.camera_p99, last.camera_p99)} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="per round")
    parser.add_argument("--load", type=float, default=0.3, help="fraction of each capacity")
    args = parser.parse_args()
    frames = camera_frames()
    volley = start_volley(args.models)
    proc, http, grpc = volley.proc, volley.http, volley.grpc
    try:
        capacity = (
            perf_analyzer("fraud", http, "http", 16, [], 5)[0],
            perf_analyzer("fraud", grpc, "grpc", 16, [], 5)[0],
        )
        rates = (capacity[0] * args.load, capacity[1] * args.load)
        rounds = []
        for index in range(1, args.rounds + 1):
            rounds.append(soak_round(index, http, grpc, rates, frames, args.seconds, proc.pid))
            print(f"  {rounds[-1].row()}", file=sys.stderr, flush=True)
    finally:
        stop(proc)
    print(report(capacity, rates, rounds, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
