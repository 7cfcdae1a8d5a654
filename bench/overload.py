"""Overload benchmark: at 3x the sustainable request rate, Volley keeps serving at capacity,
refuses the excess fast, keeps the p99 of what it accepts near its value at capacity, and its
memory stays flat.

The load is the `detect` pipeline (one 640x480 JPEG per request, gRPC or HTTP), offered
open-loop: each request leaves at its scheduled time whatever the answers before it did, as
independent cameras and apps would send. Steps: the in-process ceiling; the sustainable rate
(closed loop, as many requests in flight as the pipeline's queue bound); then open-loop at 1x
and twice at 3x that rate (the first 3x step fills the server's working set, the second shows
whether memory stays flat).

    python bench/overload.py                       # gRPC, shipped models, max_queue_size 16
    python bench/overload.py --grpc-client raw     # gRPC from a minimal HTTP/2 client
    python bench/overload.py --protocol http --seconds 20 --queue 32

The pipeline's `max_queue_size` (requests in progress) is what bounds the latency of accepted
requests under overload: about queue / capacity seconds. The load generator shares the machine
(at the lowest CPU priority unless --generator-nice says otherwise). Its gRPC client is
grpcio's asyncio client, or with `--grpc-client raw` bench/h2_client.py on uvloop, which sends
each call in one write and takes its answer in one callback (no task per call): about 9 % of
a core at 600 calls/s where grpcio's took 21 % (bench/RESULTS.md), CPU the server would lose.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import orjson
import uvloop
from h1_client import LOST, KeepAlivePool
from h2_client import UnaryClient
from serving import machine, repository_copy, rss_mb, start_volley, stop, switch_flags
from tritonclient.grpc import service_pb2 as pb
from vision import camera_frames, ceiling

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    offered: float  # req/s offered (closed loop: what it reached)
    seconds: float
    accepted_ms: list[float]
    refused_ms: list[float]
    errors: dict[str, int]
    rss_start_mb: float
    rss_peak_mb: float
    server_cpu_s: float = 0.0  # CPU time the server process used during the step
    generator_cpu_s: float = 0.0  # and this process, the load generator (same machine)
    batches: tuple[int, int] = (0, 0)  # the detector's (images, runs) during the step
    late_ms: list[float] = field(default_factory=list)  # open loop: sends behind the schedule

    def row(self) -> str:
        ok = np.array(self.accepted_ms or [np.nan])
        refused = np.array(self.refused_ms or [np.nan])
        errors = ", ".join(f"{k}: {v}" for k, v in self.errors.items()) or "0"
        return (
            f"| {self.name} | {self.offered:.1f} | {len(self.accepted_ms) / self.seconds:.1f} | "
            f"{len(self.refused_ms) / self.seconds:.1f} | {np.percentile(ok, 50):.1f} | "
            f"{np.percentile(ok, 99):.1f} | {np.percentile(refused, 50):.1f} / "
            f"{np.percentile(refused, 99):.1f} | {errors} | "
            f"{self.rss_start_mb:.0f} -> {self.rss_peak_mb:.0f} | "
            f"{self.server_cpu_s / self.seconds * 100:.0f} % | "
            f"{self.generator_cpu_s / self.seconds * 100:.0f} % | "
            f"{self.batches[0] / max(self.batches[1], 1):.1f} | "
            f"{np.percentile(self.late_ms or [0.0], 99):.1f} |"
        )


METHOD = "/inference.GRPCInferenceService/ModelInfer"
ANSWER_WAIT_S = 120  # after its last send, how long an open-loop step waits for the last answers
PROTOCOLS = {"grpc": "gRPC unary", "http": "HTTP binary tensors, keep-alive connections"}


def detector_counts(http: str) -> tuple[int, int]:
    """Images the `detector` model has run and the batches they ran in, from its statistics."""
    with urllib.request.urlopen(f"http://{http}/v2/models/detector/stats", timeout=10) as answer:
        stats = json.load(answer)["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


class Counted:
    """A step's window on the server: its CPU time and the detector's batches."""

    def __init__(self, pid: int, http: str) -> None:
        self.pid, self.http = pid, http
        self.cpu, self.own = cpu_seconds(pid), time.process_time()
        self.counts = detector_counts(http)

    def close(self, step: Step) -> None:
        step.server_cpu_s = cpu_seconds(self.pid) - self.cpu
        step.generator_cpu_s = time.process_time() - self.own
        images, runs = detector_counts(self.http)
        step.batches = (images - self.counts[0], runs - self.counts[1])


def cpu_seconds(pid: int, main_thread: bool = False) -> float:
    """User + system CPU time process `pid` has used (only its main thread's: `main_thread`)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GrpcLoad:
    """Raw unary ModelInfer calls with requests serialized once: the load generator then costs
    little more than the bytes it sends, and takes less CPU from the server beside it."""

    def __init__(self, address: str, frames: list[bytes]) -> None:
        self.payloads = []
        for frame in frames:
            request = pb.ModelInferRequest(model_name="detect")
            request.inputs.add(name="images", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(struct.pack("<I", len(frame)) + frame)
            self.payloads.append(request.SerializeToString())
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.unary_unary(METHOD)  # bytes in, bytes out

    async def connect(self) -> None:
        """Nothing to do: the channel connects on its first call."""

    def start(self, i: int, done: Callable[[str], None]) -> None:
        """Send request `i` now; `done(outcome)` runs when its answer has come."""
        finish(asyncio.ensure_future(self.send(i)), done)

    async def send(self, i: int) -> str:
        """ "ok", "refused" (429 / RESOURCE_EXHAUSTED) or what else came back."""
        try:
            await self.call(self.payloads[i % len(self.payloads)], timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "refused"
            return f"{exc.code().name}: {(exc.details() or '')[:60]}"
        return "ok"

    async def close(self) -> None:
        await self.channel.close()


class RawGrpcLoad(GrpcLoad):
    """The same calls from bench/h2_client.py over one HTTP/2 connection: no task, future or
    coroutine per call, so the generator takes as little CPU from the server as it can."""

    def __init__(self, address: str, frames: list[bytes]) -> None:
        super().__init__(address, frames)
        self.client = UnaryClient(address, METHOD)

    async def connect(self) -> None:
        await self.client.connect()

    def start(self, i: int, done: Callable[[str], None]) -> None:
        self.client.start(self.payloads[i % len(self.payloads)], lambda s: done(outcome(s)))

    async def send(self, i: int) -> str:
        return outcome(await self.client.call(self.payloads[i % len(self.payloads)]))

    async def close(self) -> None:
        self.client.close()
        await super().close()


def outcome(status: int) -> str:
    """A raw call's gRPC status as the benchmark counts it."""
    if status == 0:
        return "ok"
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    return "refused" if status == exhausted else f"status {status}"


class HttpLoad:
    """v2 HTTP with the binary tensor extension over a pool of keep-alive connections
    (bench/h1_client.py), each request built once as raw bytes."""

    def __init__(self, address: str, frames: list[bytes]) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.payloads = []
        for frame in frames:
            header = orjson.dumps(
                {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                             "parameters": {"binary_data_size": 4 + len(frame)}}]}
            )  # fmt: skip
            body = header + struct.pack("<I", len(frame)) + frame
            self.payloads.append(
                b"POST /v2/models/detect/infer HTTP/1.1\r\nHost: volley\r\n"
                b"Content-Type: application/octet-stream\r\n"
                + f"Inference-Header-Content-Length: {len(header)}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        self.pool = KeepAlivePool(self.host, self.port)

    async def connect(self) -> None:
        """Open the connections the load will need at first (more open as it needs them)."""
        await self.pool.open(32)

    def start(self, i: int, done: Callable[[str], None]) -> None:
        """Send request `i` now; `done(outcome)` runs when its answer has come."""
        self.pool.start(self.payloads[i % len(self.payloads)], lambda s: done(http_outcome(s)))

    async def send(self, i: int) -> str:
        answer = asyncio.get_running_loop().create_future()

        def done(outcome: str) -> None:
            if not answer.done():  # cancelled: the benchmark is stopping
                answer.set_result(outcome)

        self.start(i, done)
        return await answer

    async def close(self) -> None:
        self.pool.close()


def http_outcome(status: int) -> str:
    """An HTTP answer's status as the benchmark counts it."""
    if status == 200:
        return "ok"
    if status == 429:
        return "refused"
    return "connection lost" if status == LOST else f"HTTP {status}"


Load = GrpcLoad | HttpLoad


def finish(task: asyncio.Future, done: Callable[[str], None]) -> None:
    """Call `done` with `task`'s outcome when it ends (a raised error counts as an outcome)."""

    def settle(task: asyncio.Future) -> None:
        exc = task.exception()
        done(task.result() if exc is None else f"{type(exc).__name__}: {str(exc)[:60]}")

    task.add_done_callback(settle)


def recorder(step: Step, started: float, then: Callable[[], None] | None = None):
    """The callback that files the outcome of one request, sent at `started`, into `step`."""

    def record(outcome: str) -> None:
        ms = (time.perf_counter() - started) * 1e3
        if outcome == "ok":
            step.accepted_ms.append(ms)
        elif outcome == "refused":
            step.refused_ms.append(ms)
        else:
            step.errors[outcome] = step.errors.get(outcome, 0) + 1
        if then is not None:
            then()

    return record


async def one(load: Load, i: int, step: Step) -> None:
    started = time.perf_counter()
    recorder(step, started)(await load.send(i))


async def watch_memory(pid: int, step: Step, done: asyncio.Event) -> None:
    """Keep the server's peak RSS in `step` until `done` is set, or the server is gone (a
    benchmark stopped by a signal has stopped it; a crash shows as errors in the step)."""
    while not done.is_set():
        try:
            rss = rss_mb(pid)
        except (FileNotFoundError, IndexError):  # no process, or a zombie without memory
            return
        step.rss_peak_mb = max(step.rss_peak_mb, rss)
        await asyncio.sleep(0.1)


async def closed_loop(load: Load, inflight: int, seconds: float, pid: int,
                      http: str) -> Step:  # fmt: skip
    """`inflight` clients, each sending its next request when its answer comes."""
    step = Step("capacity (closed loop)", 0.0, seconds, [], [], {}, rss_mb(pid), rss_mb(pid))
    counted = Counted(pid, http)
    end = time.monotonic() + seconds
    done = asyncio.Event()

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() < end:
            await one(load, i, step)
            i += inflight

    memory = asyncio.create_task(watch_memory(pid, step, done))
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    done.set()
    await memory
    counted.close(step)
    step.offered = len(step.accepted_ms) / seconds
    return step


async def open_loop(load: Load, rate: float, seconds: float, pid: int, http: str,
                    name: str) -> Step:  # fmt: skip
    """Requests leave every 1/rate seconds, whatever happened to the ones before."""
    step = Step(name, rate, seconds, [], [], {}, rss_mb(pid), rss_mb(pid))
    counted = Counted(pid, http)
    done = asyncio.Event()
    memory = asyncio.create_task(watch_memory(pid, step, done))
    total = unanswered = int(rate * seconds)
    answered = asyncio.Event()

    def one_answered() -> None:
        nonlocal unanswered
        unanswered -= 1
        if unanswered == 0:
            answered.set()

    start_at = time.perf_counter()
    for i in range(total):
        due = start_at + i / rate
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        now = time.perf_counter()
        step.late_ms.append(max(0.0, now - due) * 1e3)
        load.start(i, recorder(step, now, one_answered))
    step.offered = total / (time.perf_counter() - start_at)  # what the generator reached
    if total:
        try:
            await asyncio.wait_for(answered.wait(), ANSWER_WAIT_S)
        except TimeoutError:  # a lost request: counted, not waited for forever
            step.errors["no answer"] = unanswered
    counted.close(step)
    done.set()
    await memory
    return step


def report(ceiling_fps: float, steps: list[Step], args: argparse.Namespace) -> str:
    queue, seconds, protocol = args.queue, args.seconds, args.protocol
    capacity, at_1x, first_3x, at_3x = steps
    p99_cap = np.percentile(capacity.accepted_ms, 99)
    p99_3x = np.percentile(at_3x.accepted_ms, 99) if at_3x.accepted_ms else float("inf")
    served = len(at_3x.accepted_ms) / seconds
    refused_p99 = np.percentile(at_3x.refused_ms, 99) if at_3x.refused_ms else float("nan")
    # The first 3x step fills the working set (ONNX Runtime's arena grows to full batches);
    # flat means the second one's peak is no higher than the first one's.
    growth = at_3x.rss_peak_mb - first_3x.rss_peak_mb
    client = f" ({args.grpc_client} client)" if protocol == "grpc" else ""
    switch = (
        f", GIL switch interval {args.switch_interval_ms:g} ms" if args.switch_interval_ms else ""
    )
    lines = [
        f"Machine: {machine()}",
        f"detect pipeline (640x480 JPEG -> boxes), {PROTOCOLS[protocol]}{client}, "
        f"max_queue_size {queue}, "
        f"{seconds:g} s per step{switch}; in-process ceiling (one loop, no server): "
        f"{ceiling_fps:.1f} images/s",
        "",
        "| step | offered req/s | accepted req/s | refused req/s | p50 accepted ms | "
        "p99 accepted ms | p50 / p99 refused ms | other errors | RSS MB | server CPU | "
        "generator CPU | images a detector run | p99 send behind schedule ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(s.row() for s in steps),
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| serves at capacity under 3x load | {served:.1f} of {capacity.offered:.1f} req/s | "
        f"{'yes' if served >= 0.9 * capacity.offered else 'NO'} |",
        f"| excess refused fast (p99 of refusals) | {refused_p99:.1f} ms | "
        f"{'yes' if refused_p99 < 20 else 'NO'} |",
        f"| p99 accepted within 2x capacity's | {p99_3x:.0f} vs {p99_cap:.0f} ms | "
        f"{'yes' if p99_3x <= 2 * p99_cap else 'NO'} |",
        f"| memory flat (peak of the second 3x step vs the first's) | {growth:+.0f} MB | "
        f"{'yes' if growth < 0.05 * first_3x.rss_peak_mb else 'NO'} |",
        f"| no other error | {sum(sum(s.errors.values()) for s in steps)} | "
        f"{'yes' if not any(s.errors for s in steps) else 'NO'} |",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace, frames: list[bytes]) -> list[Step]:
    with repository_copy(args.models, "detect", max_queue_size=args.queue) as repository:
        volley = start_volley(repository, *switch_flags(args.switch_interval_ms))
        proc = volley.proc
        os.nice(args.generator_nice)  # from here on: the load generator's priority
        if args.protocol == "grpc":
            client = RawGrpcLoad if args.grpc_client == "raw" else GrpcLoad
            load: Load = client(volley.grpc, frames)
        else:
            load = HttpLoad(volley.http, frames)
        await load.connect()
        try:
            await closed_loop(load, 4, 3, proc.pid, volley.http)  # warm up
            capacity = await closed_loop(load, args.queue, args.seconds, proc.pid, volley.http)
            print(f"  {capacity.row()}", file=sys.stderr)
            steps = [capacity]
            for factor, name in ((1, "open loop 1x"), (3, "open loop 3x"),
                                 (3, "open loop 3x, again")):  # fmt: skip
                rate = capacity.offered * factor
                step = await open_loop(load, rate, args.seconds, proc.pid, volley.http, name)
                print(f"  {step.row()}", file=sys.stderr)
                steps.append(step)
        finally:
            await load.close()
            stop(proc)
        return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=15.0, help="per step")
    parser.add_argument("--queue", type=int, default=16, help="detect's max_queue_size")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="grpc")
    parser.add_argument(
        "--grpc-client", choices=["grpcio", "raw"], default="grpcio",
        help="the generator's gRPC client: grpcio's asyncio one, or bench/h2_client.py",
    )  # fmt: skip
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=19,
        help="niceness change for the load generator: 19 (default) yields the cores to the "
        "server, 0 competes equally, below 0 (root) runs it first so that it sends and reads "
        "on time; it takes the CPU it needs in every case (reported)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        help="the server's GIL switch interval (default: Python's 5 ms)",
    )
    args = parser.parse_args()
    frames = camera_frames()
    ceiling_fps, _ = ceiling(args.models / "detector" / "1" / "model.onnx", frames, 6)
    # uvloop's event loop costs the generator less CPU; grpcio's asyncio client keeps asyncio's.
    grpcio = args.protocol == "grpc" and args.grpc_client == "grpcio"
    steps = (asyncio.run if grpcio else uvloop.run)(run(args, frames))
    print(report(ceiling_fps, steps, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
