"""Connections over the workers: this checkout against another (`--tree`), alternated.

Both serve the shipped models with `--workers 2` (or `--workers N`). Each round measures, on
each tree in turn, the two loads that a client with few connections puts on the workers: the raw
detector over HTTP binary (perf_analyzer, `--concurrency` connections) and `--streams` 30 FPS
cameras (one gRPC stream each, as `bench/vision.py`); then fraud over HTTP JSON under wrk (64
connections, as `bench/peers.py`). While each load runs, the connections each worker holds are
counted from /proc: how they were split is what the two trees differ in (the kernel's
SO_REUSEPORT hash before session 27, the supervisor's least-connections hand-off since). The
in-process ceilings (detector one image at a time; the camera pipeline in one loop) are measured
at the start of the same run.

    git worktree add /tmp/before 29ea194
    python bench/balance.py --tree /tmp/before --rounds 4 --seconds 6
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peers import JSON_BODY, wrk
from serving import ceiling, machine, perf_analyzer, start_volley, stop
from vision import camera_frames, cameras
from vision import ceiling as camera_ceiling

ROOT = Path(__file__).resolve().parents[1]


def established(port: int) -> set[str]:
    """The sockets ("socket:[inode]") of every established server-side connection on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def split(server_pid: int, port: int) -> list[int]:
    """How many of the connections on `port` each worker of the server holds, most first."""
    sockets = established(port)
    counts = collections.Counter()
    for task in Path("/proc").iterdir():
        if not task.name.isdigit():
            continue
        try:
            if int((task / "stat").read_text().rsplit(")", 1)[1].split()[1]) != server_pid:
                continue
            for fd in (task / "fd").iterdir():
                if os.readlink(fd) in sockets:
                    counts[int(task.name)] += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return sorted(counts.values(), reverse=True)


@contextmanager
def splitting(server_pid: int, address: str, after: float) -> Iterator[list]:
    """For the `with` block (a load on `address`): the split counted once, `after` seconds in,
    as the one item of the list yielded (there once the block ends)."""
    result: list = []
    port = int(address.rsplit(":", 1)[1])
    thread = threading.Thread(
        target=lambda: (time.sleep(after), result.append(split(server_pid, port))), daemon=True
    )
    thread.start()
    yield result
    thread.join()


def one_round(tree: Path, models: Path, frames: list[bytes], args: argparse.Namespace) -> dict:
    """Every load on a `--workers N` server of `tree`."""
    volley = start_volley(models, "--workers", str(args.workers), tree=tree)
    pid = volley.proc.pid
    try:
        with splitting(pid, volley.http, args.seconds) as http_split:
            rps, _, p99 = perf_analyzer(
                "detector", volley.http, "http", args.concurrency, [], args.seconds
            )
        with splitting(pid, volley.grpc, args.seconds / 2) as grpc_split:
            row = cameras(volley.grpc, frames, args.streams, args.seconds)
        with splitting(pid, volley.http, args.seconds / 2) as json_split:
            url = f"http://{volley.http}/v2/models/fraud/infer"
            json_rps, _, json_p99 = wrk(url, JSON_BODY, args.seconds)
    finally:
        stop(volley.proc)
    return {
        "detector": (rps, p99, http_split[0]),
        "cameras": (row.processed_fps, row.skipped, row.p99_ms, grpc_split[0]),
        "fraud": (json_rps, json_p99, json_split[0]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=8, help="detector connections")
    parser.add_argument("--streams", type=int, default=4, help="cameras")
    parser.add_argument("--workers", type=int, default=2, help="the servers' --workers")
    args = parser.parse_args()
    trees = {"this checkout": ROOT, str(args.tree): args.tree.resolve()}
    frames = camera_frames()
    model_file = ROOT / "models" / "detector" / "1" / "model.onnx"
    detector_ceiling = ceiling(model_file, args.seconds)[0].rps
    camera_fps, _ = camera_ceiling(model_file, frames, args.seconds)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(ROOT / "models", models)
        for number in range(args.rounds):
            order = list(trees.items())
            if number % 2:
                order.reverse()
            for name, tree in order:
                results[name].append(one_round(tree, models, frames, args))
                print(f"round {number + 1}, {name}: {results[name][-1]}", file=sys.stderr)
    print(report(results, detector_ceiling, camera_fps, args))
    return 0


def report(
    results: dict[str, list[dict]],
    detector_ceiling: float,
    camera_fps: float,
    args: argparse.Namespace,
) -> str:
    lines = [
        f"Machine: {machine()}",
        "",
        f"In-process ceilings: detector {detector_ceiling:.0f} images/s (one at a time), "
        f"camera pipeline {camera_fps:.1f} frames/s.",
        "",
        f"| tree | round | detector c={args.concurrency}: images/s, p99 ms, split | "
        f"{args.streams} cameras: frames/s, skipped, p99 ms, split | "
        "fraud HTTP JSON, wrk c=64: req/s, p99 ms, split |",
        "|---|---:|---|---|---|",
    ]
    for name, rounds in results.items():
        for number, result in enumerate(rounds, 1):
            rps, p99, http_split = result["detector"]
            fps, skipped, camera_p99, grpc_split = result["cameras"]
            json_rps, json_p99, json_split = result["fraud"]
            lines.append(
                f"| {name} | {number} | {rps:.0f}, {p99:.1f}, {'/'.join(map(str, http_split))} "
                f"| {fps:.1f}, {skipped:.1%}, {camera_p99:.1f}, "
                f"{'/'.join(map(str, grpc_split))} "
                f"| {json_rps:,.0f}, {json_p99:.1f}, {'/'.join(map(str, json_split))} |"
            )
        detector = [r["detector"] for r in rounds]
        camera = [r["cameras"] for r in rounds]
        fraud = [r["fraud"] for r in rounds]
        lines.append(
            f"| {name} | median | {statistics.median(d[0] for d in detector):.0f}, "
            f"{statistics.median(d[1] for d in detector):.1f} | "
            f"{statistics.median(c[0] for c in camera):.1f} "
            f"({statistics.median(c[0] for c in camera) / camera_fps:.0%} of the ceiling), "
            f"{statistics.median(c[1] for c in camera):.1%}, "
            f"{statistics.median(c[2] for c in camera):.1f} | "
            f"{statistics.median(f[0] for f in fraud):,.0f}, "
            f"{statistics.median(f[1] for f in fraud):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
