"""Volley's own cost per HTTP JSON infer request, without sockets: the event loop's share.

Calls `HttpFrontEnd.answer_infer` (what the HTTP protocol hands every `POST .../infer` to: codec,
validation, data plane, batcher, response, metrics) from 64 concurrent tasks in this process, on
the fraud model with the peer benchmark's settings (bench/peers.py), and reports the event-loop
thread's CPU time per request. Socket reads and writes and the HTTP parser are not included:
they are the same for every Python server (bench/peers.py measures whole servers).

    python bench/hot_path.py                       # CPU time per request, min of 12 windows
    python bench/hot_path.py --instructions        # instructions per request, under valgrind
    python bench/hot_path.py --whole-server [--tree OTHER_CHECKOUT]
                                                   # the real server's, sockets and HTTP included

CPU time on a shared VM moves by a quarter from minute to minute; `--instructions` counts the
event-loop thread's instructions (valgrind's callgrind, `apt-get install valgrind`) for two run
lengths and divides the difference by the extra requests: the same figure on every run, for
comparing two versions of the code. `--whole-server` counts the same way in a real server (`python
-m server serve` under callgrind, instrumented only while a closed loop keeps 64 single-row
requests in flight: HTTP JSON, HTTP binary, gRPC): the event-loop thread's user-space instructions
per request, HTTP parsing, keep-alive, the task per request and the batch hand-offs included
(the kernel's share of reads and writes is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import uvloop
from h1_client import KeepAlivePool
from h2_client import UnaryClient
from peers import FEATURES, JSON_BODY, volley_repository
from serving import ceiling, machine, volley_running
from tritonclient.grpc import service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.dataplane import DataPlane  # noqa: E402 - after the path above
from server.http_api import INFER_ROUTE, HttpFrontEnd  # noqa: E402
from server.repository import ModelRepository  # noqa: E402

CONCURRENCY = 64
BODY = JSON_BODY
HEADERS = {b"content-type": b"application/json", b"content-length": str(len(BODY)).encode()}
ROW = np.full(FEATURES, 0.5, np.float32).tobytes()  # JSON_BODY's row, as binary tensor data


def http_request(binary: bool) -> bytes:
    """A whole single-row infer request to the fraud model: JSON, or binary tensor data both
    ways as perf_analyzer sends it."""
    if not binary:
        body, extra = BODY, "Content-Type: application/json\r\n"
    else:
        header = orjson.dumps({
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, FEATURES],
                        "parameters": {"binary_data_size": len(ROW)}}],
            "outputs": [{"name": name, "parameters": {"binary_data": True}}
                        for name in ("score", "is_fraud")],
        })  # fmt: skip
        body = header + ROW
        extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
    head = f"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: volley\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def serve_requests(repository: Path, windows: int, per_task: int) -> list[float]:
    """Event-loop CPU microseconds per request in each window (after one warm-up window)."""
    models = ModelRepository(repository, "none")
    await models.load_at_start(["*"])
    front_end = HttpFrontEnd(DataPlane(models), 64 << 20, 16 << 20)
    route = INFER_ROUTE.match("/v2/models/fraud/infer")

    async def receive() -> dict:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def client() -> None:
        for _ in range(per_task):
            answer = await front_end.answer_infer(route, HEADERS, "127.0.0.1", receive)
            if answer.status != 200:
                raise RuntimeError(f"{answer.status}: {answer.body!r}")

    per_request = []
    for window in range(windows + 1):
        started = time.thread_time()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        if window:  # the first one warms up
            per_request.append((time.thread_time() - started) / (CONCURRENCY * per_task) * 1e6)
    return per_request


def loop_instructions(requests: int) -> int:
    """Instructions of the event-loop thread in a run of `requests` requests (callgrind)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--cache-sim=no",
             f"--callgrind-out-file={out}", sys.executable, __file__,
             "--windows", "0", "--requests", str(requests), "--only-serve"],
            check=True, capture_output=True,
        )  # fmt: skip
        return callgrind_total(Path(f"{out}-01").read_text())


def callgrind_total(profile: str) -> int:
    """The instruction total of one thread's callgrind output (`summary:`, or `totals:` in a
    dump taken with callgrind_control)."""
    return int(re.search(r"^(?:summary|totals):\s+(\d+)", profile, re.M)[1])


def grpc_message() -> bytes:
    """A single-row `ModelInfer` message to the fraud model as perf_analyzer sends it (the input
    in `raw_input_contents`, both outputs asked for)."""
    request = pb.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="features", datatype="FP32", shape=[1, FEATURES])
    request.raw_input_contents.append(ROW)
    for name in ("score", "is_fraud"):
        request.outputs.add(name=name)
    return request.SerializeToString()


async def closed_loop(port: int, request: bytes, requests: int, grpc: bool = False) -> None:
    """`request` sent `requests` times, CONCURRENCY at a time, each next one sent when an answer
    comes: over keep-alive HTTP/1.1 connections, or as gRPC `ModelInfer` calls on one HTTP/2
    connection (as perf_analyzer does); raises unless all are answered 200 (gRPC: OK)."""
    if grpc:
        pool = UnaryClient(f"127.0.0.1:{port}", "/inference.GRPCInferenceService/ModelInfer")
        await pool.connect()
        ok = 0
    else:
        pool = KeepAlivePool("127.0.0.1", port)
        await pool.open(CONCURRENCY)
        ok = 200
    finished = asyncio.get_running_loop().create_future()
    sent = answered = 0
    failed: list[int] = []

    def done(status: int) -> None:
        nonlocal sent, answered
        answered += 1
        if status != ok:
            failed.append(status)
        if answered == requests:
            finished.set_result(None)
        elif sent < requests:
            sent += 1
            pool.start(request, done)

    for _ in range(min(CONCURRENCY, requests)):
        sent += 1
        pool.start(request, done)
    await finished
    pool.close()
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. with status {failed[0]}")


def server_instructions(
    repository: Path, tree: Path, request: bytes, requests: int, grpc: bool = False
) -> int:
    """Instructions of a real server's event-loop thread per request (see the module doc)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        valgrind = ("valgrind", "--tool=callgrind", "--separate-threads=yes", "--cache-sim=no",
                    "--instr-atstart=no", f"--callgrind-out-file={out}")  # fmt: skip
        # one process: under `--workers N` the pid is the supervisor's, which serves nothing
        with volley_running(repository, "--workers", "1", tree=tree, launcher=valgrind) as volley:
            port = int((volley.grpc if grpc else volley.http).rsplit(":", 1)[1])
            pid = str(volley.proc.pid)
            uvloop.run(closed_loop(port, request, 500, grpc))  # warm-up, not counted
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
            uvloop.run(closed_loop(port, request, requests, grpc))
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
            main_thread = next(Path(folder).glob("callgrind.out.*-01")).read_text()
        return callgrind_total(main_thread) // requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--requests", type=int, default=9600, help="per window")
    parser.add_argument("--instructions", action="store_true", help="count under valgrind")
    parser.add_argument("--whole-server", action="store_true", help="a real server's, counted")
    parser.add_argument("--tree", type=Path, help="with --whole-server: also this checkout")
    parser.add_argument("--only-serve", action="store_true", help=argparse.SUPPRESS)  # for it
    args = parser.parse_args()
    per_task = max(args.requests // CONCURRENCY, 1)
    if args.only_serve:  # one run for `--instructions`: nothing else on the loop thread
        with tempfile.TemporaryDirectory() as folder:
            repository = volley_repository(args.models / "fraud", Path(folder))
            uvloop.run(serve_requests(repository, args.windows, per_task))
        return 0
    print(f"Machine: {machine()}")
    if args.whole_server:
        trees = [("this checkout", ROOT)] + ([(str(args.tree), args.tree)] if args.tree else [])
        print(
            f"\nevent-loop instructions per single-row fraud request, whole server, "
            f"c={CONCURRENCY}, {args.requests} requests counted:\n\n"
            "| tree | HTTP JSON | HTTP binary | gRPC |\n|---|---:|---:|---:|"
        )
        with tempfile.TemporaryDirectory() as folder:
            repository = volley_repository(args.models / "fraud", Path(folder))
            for name, tree in trees:
                kinds = [(http_request(False), False), (http_request(True), False),
                         (grpc_message(), True)]  # fmt: skip
                counts = [server_instructions(repository, tree, request, args.requests, grpc)
                          for request, grpc in kinds]  # fmt: skip
                print(f"| {name} | " + " | ".join(f"{c / 1000:,.1f}k" for c in counts) + " |")
        return 0
    if args.instructions:
        short, long = 10 * CONCURRENCY, 100 * CONCURRENCY
        extra = (loop_instructions(long) - loop_instructions(short)) / (long - short)
        print(f"\nevent-loop instructions per fraud JSON request (answer_infer, c={CONCURRENCY}):"
              f" {extra / 1000:,.1f}k")  # fmt: skip
        return 0
    with tempfile.TemporaryDirectory() as folder:
        repository = volley_repository(args.models / "fraud", Path(folder))
        print(f"fraud, single-row v2 JSON, {CONCURRENCY} tasks, {per_task * CONCURRENCY} "
              f"requests per window, {args.windows} windows")  # fmt: skip
        windows = uvloop.run(serve_requests(repository, args.windows, per_task))
        (one_row, *_) = ceiling(args.models / "fraud" / "1" / "model.onnx", 1)
    windows.sort()
    print("\n| measure | value |\n|---|---:|")
    print(f"| event-loop CPU us per request, min of windows | {windows[0]:.1f} |")
    print(f"| event-loop CPU us per request, median | {windows[len(windows) // 2]:.1f} |")
    print(f"| in-process ONNX Runtime, one row at a time, us per request | "
          f"{1e6 / one_row.rps:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
