"""Peer comparison in one run: Volley, Triton 2.51, a naive FastAPI server and the batched
raw-ASGI floor (bench/batched_floor.py: what one Python process reaches doing nothing but
batching) on the same fraud model and batching settings, against the in-process ONNX Runtime
ceiling.

Each server is measured alone under `wrk` (single-row v2 JSON, one thread, 64 connections) and
`perf_analyzer` (HTTP binary tensors and gRPC, concurrency 64 and 1). Each row records the load
average and the server's CPU time per request (all of its processes), so a figure can be read
against what the machine was doing. Then Volley, the floor and Triton take turns under wrk
and (but the floor) perf_analyzer's HTTP binary and gRPC at c=64 (`--floor-rounds`): this VM's
speed drifts by a quarter within minutes, so the c=64 targets are judged on Volley's ratio to
each peer within a round, not on rows minutes apart.
Two Volleys take part in those rounds: one process with the peers' settings, and Volley as
shipped with `--workers auto` (`--pairs-workers`), which, like Triton, uses every core.

    python bench/peers.py                    # 10 s per measurement
    python bench/peers.py --seconds 5 --skip-triton
    python bench/peers.py --seconds 5 --skip-triton --skip-naive --volley-workers 1,2
    python bench/peers.py --seconds 5 --skip-triton --skip-naive --floor-rounds 9
    python bench/peers.py --seconds 5 --skip-naive --floor-rounds 9 --pairs-workers 2
    python bench/peers.py --seconds 5 --skip-triton --skip-naive --floor-rounds 0 \
        --busy-poll off,default,always

Triton comes from ../shared/tools/triton/setup (its python backend runs the same ONNX model
with onnxruntime, under Triton's own dynamic batcher: max_batch_size 1024, 100 us delay, two
instances); Volley gets the same settings. The c=1 targets are judged on Volley with the shipped
fraud config (no queue delay, so a lone request runs on the event loop), with the server's
default busy polling and with it off: that is what a user gets one request at a time. `wrk` is
Debian's package (apt-get install wrk). All load generators run on the same machine as the
server and take CPU from it. The floor runs under wrk only (it speaks no more of the protocol
than a JSON infer).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import yaml
from serving import (
    BUSY_POLL_FLAGS,
    ceiling,
    free_port,
    machine,
    perf_analyzer,
    start,
    start_volley,
    stop,
)

ROOT = Path(__file__).resolve().parents[1]
TRITON = ROOT.parent / "shared" / "tools" / "triton"
FEATURES = 17
BATCHING = {"max_queue_delay_us": 100, "max_queue_size": 4096}
INSTANCES = 2
FLOOR = "batched raw-ASGI floor"  # bench/batched_floor.py: one process, nothing but batching
TRITON_NAME = "Triton 2.51"
SHIPPED = "Volley, shipped config"  # models/fraud/config.yaml as it is, not the peers' settings
WRK_JSON = "HTTP JSON, wrk c=64"  # the name of wrk's load in every table
# the single-row fraud request every JSON load sends
JSON_BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, FEATURES],
                 "data": [0.5] * FEATURES}]}
)  # fmt: skip


@dataclass
class Row:
    server: str
    load: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # server CPU time per request
    loadavg: float

    def line(self) -> str:
        return (
            f"| {self.server} | {self.load} | {self.rps:,.0f} | {self.p50_ms:.2f} | "
            f"{self.p99_ms:.2f} | {self.cpu_us:.0f} | {self.loadavg:.2f} |"
        )


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of process `root` and every live process it started, and they
    started (Triton's python-backend stubs, Volley's workers)."""
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])

    def in_tree(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return sum(t for pid, t in ticks.items() if in_tree(pid)) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, body: bytes, seconds: float) -> tuple[float, float, float]:
    """req/s, p50 ms and p99 ms of `wrk -t1 -c64` posting `body`."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {orjson.dumps(body.decode()).decode()}\n"
        )
        run = subprocess.run(
            ["wrk", "-t1", "-c64", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
    out = run.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx[1]} errors from {url}:\n{out}")

    def percentile(p: str) -> float:
        value, unit = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return rps, percentile("50"), percentile("99")


def measure(server: str, pid: int, loads: dict, seconds: float) -> list[Row]:
    rows = []
    for name, run in loads.items():
        before, started = tree_cpu_seconds(pid), time.perf_counter()
        try:
            rps, p50, p99 = run()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if server.startswith("Volley"):
                raise
            # A peer's failure is reported, not fatal to the run: its row is left out.
            print(f"  {server}, {name}: did not finish ({type(exc).__name__})", file=sys.stderr)
            continue
        elapsed = time.perf_counter() - started
        cpu = tree_cpu_seconds(pid) - before
        # perf_analyzer measures windows inside a longer run: CPU over all it sent
        cpu_us = cpu / max(rps * elapsed, 1) * 1e6
        rows.append(Row(server, name, rps, p50, p99, cpu_us, os.getloadavg()[0]))
        print(f"  {rows[-1].line()}", file=sys.stderr, flush=True)
    return rows


def standard_loads(
    http: str,
    grpc: str,
    body: bytes,
    seconds: float,
    model: str,
    concurrency: tuple[int, ...] = (64, 1),
) -> dict:
    """wrk's HTTP JSON at c=64, then perf_analyzer's HTTP binary and gRPC at each
    `concurrency`."""
    wrk_json = {WRK_JSON: lambda: wrk(f"http://{http}/v2/models/{model}/infer", body, seconds)}
    return wrk_json | perf_analyzer_loads(http, grpc, seconds, model, concurrency)


def perf_analyzer_loads(
    http: str, grpc: str, seconds: float, model: str, concurrency: tuple[int, ...]
) -> dict:
    """perf_analyzer's HTTP binary and gRPC loads at each concurrency, by name."""
    loads = {}
    for c in concurrency:
        loads[f"HTTP binary, perf_analyzer c={c}"] = lambda c=c: perf_analyzer(
            model, http, "http", c, [], seconds / 3
        )
        loads[f"gRPC, perf_analyzer c={c}"] = lambda c=c: perf_analyzer(
            model, grpc, "grpc", c, [], seconds / 3
        )
    return loads


def measure_v2_server(
    name: str, proc: subprocess.Popen, http: str, grpc: str, body: bytes, seconds: float
) -> list[Row]:
    """The standard loads against a v2 server at loopback `host:port` addresses, which is
    stopped after."""
    try:
        return measure(name, proc.pid, standard_loads(http, grpc, body, seconds, "fraud"), seconds)
    finally:
        stop(proc)


def volley_repository(model_dir: Path, repo: Path) -> Path:
    """A repository at `repo` serving the fraud model with the peers' batching settings."""
    peers = {"dynamic_batching": BATCHING, "instance_count": INSTANCES, "intra_op_threads": 1}
    return changed_repository(model_dir, repo, peers)


def changed_repository(model_dir: Path, repo: Path, changes: dict[str, object]) -> Path:
    """A repository at `repo` serving `model_dir` under its folder's name, with these config
    keys set."""
    shutil.copytree(model_dir, repo / model_dir.name)
    config_file = repo / model_dir.name / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update(changes)
    config_file.write_text(yaml.safe_dump(config))
    return repo


def run_volley(
    model_dir: Path, tmp: Path, body: bytes, seconds: float, workers: int = 1
) -> list[Row]:
    repo = volley_repository(model_dir, tmp / f"volley-{workers}")
    volley = start_volley(repo, "--workers", str(workers))
    name = "Volley" if workers == 1 else f"Volley --workers {workers}"
    return measure_v2_server(name, volley.proc, volley.http, volley.grpc, body, seconds)


def run_volley_shipped(
    model_dir: Path, tmp: Path, body: bytes, seconds: float, busy_poll: str
) -> list[Row]:
    """Volley on the shipped fraud config (no queue delay, one instance: a lone request runs on
    the event loop) and its default `--workers`, at c=1 only: what a user of `volley serve` gets
    one request at a time."""
    repo = Path(tempfile.mkdtemp(prefix="shipped-", dir=tmp))  # a value may come again
    shutil.copytree(model_dir, repo / "fraud")
    volley = start_volley(repo, *BUSY_POLL_FLAGS[busy_poll])
    name = SHIPPED if busy_poll == "default" else f"{SHIPPED}, busy poll {busy_poll}"
    loads = standard_loads(volley.http, volley.grpc, body, seconds, "fraud")
    one_at_a_time = {load: run for load, run in loads.items() if load.endswith("c=1")}
    try:
        return measure(name, volley.proc.pid, one_at_a_time, seconds)
    finally:
        stop(volley.proc)


def start_triton(model_file: Path, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """Triton 2.51 serving `model_file` as `fraud` with the peers' batching; its process and
    loopback HTTP and gRPC addresses, once ready."""
    wrapper = subprocess.run(
        [str(TRITON / "setup")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    folder = Path(tempfile.mkdtemp(prefix="triton-", dir=tmp))
    repo, models = folder / "triton_repo", folder / "triton_models"
    shutil.copytree(TRITON / "example", repo)
    config = repo / "fraud" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 20 ]", f"dims: [ {FEATURES} ]"))
    models.mkdir()
    shutil.copy(model_file, models / "fraud.onnx")
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = start(
        [wrapper, f"--model-repository={repo}", "--http-address=127.0.0.1",
         f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
         "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
         "--allow-gpu-metrics=false"],
        f"http://127.0.0.1:{http}/v2/health/ready",
        env={"MODELS": str(models)},
    )  # fmt: skip
    return proc, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"


def run_triton(model_file: Path, tmp: Path, body: bytes, seconds: float) -> list[Row]:
    proc, http, grpc = start_triton(model_file, tmp)
    return measure_v2_server(TRITON_NAME, proc, http, grpc, body, seconds)


def run_naive(model_dir: Path, body: bytes, seconds: float) -> list[Row]:
    port = free_port()
    proc = start(
        [sys.executable, "bench/naive_server.py", str(model_dir), str(port)],
        f"http://127.0.0.1:{port}/v2",
    )
    try:
        url = f"http://127.0.0.1:{port}/v2/models/fraud/infer"
        return measure("naive FastAPI", proc.pid, {WRK_JSON: lambda: wrk(
            url, body, seconds)}, seconds)  # fmt: skip
    finally:
        stop(proc)


def run_alternating(
    model_dir: Path,
    tmp: Path,
    body: bytes,
    seconds: float,
    rounds: int,
    with_triton: bool,
    shipped_workers: str | None,
) -> tuple[list[Row], dict[tuple[str, str, str], list[float]]]:
    """Volley, the batched raw-ASGI floor and (`with_triton`) Triton in turn, `rounds` times
    each (all started once), under wrk's HTTP JSON and, but for the floor (it speaks JSON
    only), perf_analyzer's HTTP binary and gRPC at c=64: this VM's speed drifts by a quarter
    within minutes, so Volley is compared with each peer per round. Volley runs with the peers'
    settings in one process, and (`shipped_workers`) also as shipped with `--workers
    shipped_workers`. Returns each server's median row per load and, per (Volley variant, peer,
    load), Volley's req/s over the peer's in each round."""
    started: list[subprocess.Popen] = []
    servers: dict[str, tuple[int, dict]] = {}  # name: (pid, its loads by name)

    def v2_loads(http: str, grpc: str) -> dict:
        return standard_loads(http, grpc, body, seconds, "fraud", (64,))

    try:
        volley = start_volley(volley_repository(model_dir, tmp / "volley-pairs"), "--workers", "1")
        started.append(volley.proc)
        servers["Volley"] = (volley.proc.pid, v2_loads(volley.http, volley.grpc))
        if shipped_workers:
            repo = changed_repository(model_dir, tmp / "shipped-pairs", {})
            shipped = start_volley(repo, "--workers", shipped_workers)
            started.append(shipped.proc)
            name = f"{SHIPPED}, --workers {shipped_workers}"
            servers[name] = (shipped.proc.pid, v2_loads(shipped.http, shipped.grpc))
        volleys = list(servers)
        port = free_port()
        model_file = model_dir / "1" / "model.onnx"
        floor = start(
            [sys.executable, "bench/batched_floor.py", str(model_file), str(port)],
            f"http://127.0.0.1:{port}/v2/health/ready",
        )
        started.append(floor)
        floor_url = f"http://127.0.0.1:{port}/v2/models/fraud/infer"
        servers[FLOOR] = (floor.pid, {WRK_JSON: lambda: wrk(floor_url, body, seconds)})
        if with_triton:
            triton, http, grpc = start_triton(model_file, tmp)
            started.append(triton)
            servers[TRITON_NAME] = (triton.pid, v2_loads(http, grpc))
        # each (server, load)'s row by round: a peer's failed run leaves its round out
        runs: dict[tuple[str, str], dict[int, Row]] = {}
        for number in range(rounds):
            for name, (pid, loads) in servers.items():
                for row in measure(name, pid, loads, seconds):
                    runs.setdefault((name, row.load), {})[number] = row
    finally:
        for proc in started:
            stop(proc)
    ratios = {
        (mine, peer, load): [
            runs[mine, load][n].rps / theirs[n].rps
            for n in sorted(theirs.keys() & runs[mine, load].keys())
        ]
        for (peer, load), theirs in runs.items()
        if peer not in volleys
        for mine in volleys
        if (mine, load) in runs
    }
    medians = []
    for (_, load), by_round in runs.items():
        median = sorted(by_round.values(), key=lambda r: r.rps)[len(by_round) // 2]
        medians.append(replace(median, load=f"{load}, alternating (median of {len(by_round)})"))
    return medians, ratios


def report(
    ceiling_rps: float,
    ceiling_p50: float,
    rows: list[Row],
    seconds: float,
    ratios: dict[tuple[str, str, str], list[float]] | None = None,
) -> str:
    def find(server: str, load: str) -> Row | None:
        return next((r for r in rows if r.server == server and r.load == load), None)

    lines = [
        f"Machine: {machine()}",
        f"fraud (17 raw columns), single-row requests, {seconds:g} s per wrk run; in-process "
        f"ONNX Runtime ceiling: {ceiling_rps:,.0f} req/s one at a time, p50 {ceiling_p50:.3f} ms",
        "",
        "| server | load | req/s | p50 ms | p99 ms | server CPU us/request | load average |",
        "|---|---|---|---|---|---|---|",
        *(r.line() for r in rows),
    ]
    volley_json = find("Volley", WRK_JSON)
    triton_json = find(TRITON_NAME, WRK_JSON)
    ratios = ratios or {}
    checks = []
    for (mine, peer, load), each in ratios.items():
        ratio = statistics.median(each)
        if peer == TRITON_NAME:
            factor = 1.2 if load == WRK_JSON else 1.0  # the JSON target is 1.2x
            target = "1.2x Triton" if factor > 1 else "Triton"
            value, met = f"{ratio:.2f}x", ratio >= factor
            rounds = ", ".join(f"{r:.2f}x" for r in each)
        else:
            target, value, met = f"90 % of the {FLOOR}", f"{ratio:.0%}", ratio >= 0.9
            rounds = ", ".join(f"{r:.0%}" for r in each)
        checks.append((f"{load}, {mine}, >= {target} (median of the alternating rounds)",
                       f"{value} (rounds: {rounds})", met))  # fmt: skip
    if not any(peer == TRITON_NAME for _, peer, _ in ratios) and volley_json and triton_json:
        ratio = volley_json.rps / triton_json.rps
        checks.append(("HTTP JSON (wrk) >= 1.2x Triton", f"{ratio:.2f}x", ratio >= 1.2))
    for load in ("HTTP binary, perf_analyzer c=64", "gRPC, perf_analyzer c=64"):
        mine, theirs = find("Volley", load), find(TRITON_NAME, load)
        if mine and theirs and not any(key[2] == load for key in ratios):  # not alternated
            ratio = mine.rps / theirs.rps
            checks.append((f"{load} >= Triton", f"{ratio:.2f}x", ratio >= 1.0))
    grpc, binary = (
        find("Volley", "gRPC, perf_analyzer c=64"),
        find("Volley", "HTTP binary, perf_analyzer c=64"),
    )
    if grpc and binary:
        ratio = grpc.rps / binary.rps
        checks.append(("Volley gRPC >= 90 % of its HTTP binary", f"{ratio:.0%}", ratio >= 0.9))
    one_at_a_time = ("HTTP binary, perf_analyzer c=1", "gRPC, perf_analyzer c=1")
    shipped = [r for r in rows if r.server.startswith(SHIPPED) and r.load in one_at_a_time]
    for row in shipped or [r for r in rows if r.server == "Volley" and r.load in one_at_a_time]:
        extra = row.p50_ms - ceiling_p50
        checks.append((f"{row.server}, {row.load}: p50 <= ceiling + 0.3 ms",
                       f"+{extra:.3f} ms", extra <= 0.3))  # fmt: skip
    for label, row in (("HTTP JSON", volley_json), ("gRPC", grpc)):
        if row:
            checks.append((f"Volley {label} p99 <= 10 ms at c=64", f"{row.p99_ms:.1f} ms",
                           row.p99_ms <= 10))  # fmt: skip
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--floor-rounds", type=int, default=5, metavar="N",
        help="wrk runs of Volley, the batched floor and Triton in turn, N each (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--pairs-workers",
        default="auto",
        metavar="N",
        help="in the alternating rounds, also Volley as shipped with --workers N "
        "(a count or 'auto'; empty: not)",
    )
    parser.add_argument(
        "--volley-workers",
        default="1",
        metavar="N[,N...]",
        help="measure Volley with each of these --workers counts (default: 1)",
    )
    parser.add_argument(
        "--busy-poll",
        default="default,off",
        metavar="MODE[,MODE...]",
        help="c=1 rows of Volley on the shipped fraud config, one per busy polling mode "
        f"({', '.join(BUSY_POLL_FLAGS)}; the c=1 targets are judged on these; empty: none)",
    )
    args = parser.parse_args()
    busy_polls = [mode for mode in args.busy_poll.split(",") if mode]
    if unknown := set(busy_polls) - set(BUSY_POLL_FLAGS):
        parser.error(f"--busy-poll: {sorted(unknown)} not among {list(BUSY_POLL_FLAGS)}")
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    model_dir = args.models / "fraud"
    model_file = model_dir / "1" / "model.onnx"
    body = JSON_BODY
    (first, *_) = ceiling(model_file, 3)  # one row at a time: the c=1 ceiling
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for workers in (int(n) for n in args.volley_workers.split(",")):
            rows += run_volley(model_dir, tmp, body, args.seconds, workers)
        for busy_poll in busy_polls:
            rows += run_volley_shipped(model_dir, tmp, body, args.seconds, busy_poll)
        if not args.skip_triton:
            rows += run_triton(model_file, tmp, body, args.seconds)
        if not args.skip_naive:
            rows += run_naive(model_dir, body, args.seconds)
        ratios = None
        if args.floor_rounds:
            medians, ratios = run_alternating(
                model_dir, tmp, body, args.seconds, args.floor_rounds, not args.skip_triton,
                args.pairs_workers or None,
            )  # fmt: skip
            rows += medians
    print(report(first.rps, first.p50_ms, rows, args.seconds, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
