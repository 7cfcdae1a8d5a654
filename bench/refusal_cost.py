"""What one refusal costs the event loop: a full `detect` pipeline refusing JPEG requests.

Under overload most requests are refused, and every microsecond of the event loop a refusal
takes is taken from the requests being served (bench/overload.py). This serves the shipped
models with `detect` at `max_queue_size: 1`, sends 640x480 JPEGs in a closed loop (16 keep-alive
HTTP connections with binary tensors, or 16 calls at once on one gRPC connection) so that nearly
every request is refused, and divides the CPU time of the server's main thread (the event loop)
by the answers.

    python bench/refusal_cost.py                          # this checkout, two rounds
    python bench/refusal_cost.py --tree /tmp/old --rounds 3   # alternated with another checkout

`--tree` names another checkout (e.g. `git worktree add /tmp/old HEAD~1`), run in alternation
with this one, so both meet the same phases of a shared VM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import uvloop
from h1_client import KeepAlivePool
from h2_client import UnaryClient
from serving import machine, repository_copy, volley_running
from tritonclient.grpc import service_pb2 as pb
from vision import camera_frames

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 16
OK = {"http": 200, "grpc": 0}


def loop_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process's main thread (its event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_request(frame: bytes) -> bytes:
    header = orjson.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": 4 + len(frame)}}]}
    )  # fmt: skip
    body = header + struct.pack("<I", len(frame)) + frame
    return (
        b"POST /v2/models/detect/infer HTTP/1.1\r\nHost: volley\r\n"
        b"Content-Type: application/octet-stream\r\n"
        + f"Inference-Header-Content-Length: {len(header)}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def grpc_request(frame: bytes) -> bytes:
    images = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
    request = pb.ModelInferRequest(
        model_name="detect",
        inputs=[images],
        raw_input_contents=[struct.pack("<I", len(frame)) + frame],
    )
    return request.SerializeToString()


async def closed_loop(
    start: Callable[[Callable[[int], None]], None], seconds: float
) -> dict[int, int]:
    """Keep CONNECTIONS requests in flight for `seconds`; the count of each answer status."""
    counts: dict[int, int] = {}
    stop_at = time.monotonic() + seconds
    finished = asyncio.get_running_loop().create_future()
    in_flight = 0

    def answered(status: int) -> None:
        nonlocal in_flight
        counts[status] = counts.get(status, 0) + 1
        in_flight -= 1
        send()

    def send() -> None:
        nonlocal in_flight
        if time.monotonic() < stop_at:
            in_flight += 1
            start(answered)
        elif in_flight == 0 and not finished.done():
            finished.set_result(None)

    for _ in range(CONNECTIONS):
        send()
    await finished
    return counts


async def measure(pid: int, http: str, grpc: str, protocol: str, seconds: float) -> tuple:
    """(answers, refusals, event-loop CPU seconds) of one protocol's closed loop."""
    frame = camera_frames(1)[0]
    if protocol == "http":
        host, port = http.rsplit(":", 1)
        pool = KeepAlivePool(host, int(port))
        await pool.open(CONNECTIONS)
        request = http_request(frame)

        def start(done: Callable[[int], None]) -> None:
            pool.start(request, done)

        close = pool.close
    else:
        client = UnaryClient(grpc, "/inference.GRPCInferenceService/ModelInfer")
        await client.connect()
        message = grpc_request(frame)

        def start(done: Callable[[int], None]) -> None:
            client.start(message, done)

        close = client.close
    await closed_loop(start, 1.0)  # warm up
    before = loop_cpu_seconds(pid)
    counts = await closed_loop(start, seconds)
    cpu = loop_cpu_seconds(pid) - before
    close()
    answers = sum(counts.values())
    return answers, answers - counts.get(OK[protocol], 0), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="another checkout, run in alternation")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    trees = [("this checkout", ROOT)] + ([(str(args.tree), args.tree)] if args.tree else [])
    print(f"Machine: {machine()}")
    print(f"detect, max_queue_size 1, 640x480 JPEG, {CONNECTIONS} in flight, {args.seconds:g} s\n")
    print("| tree | round | protocol | answers/s | refused | event-loop CPU us per answer |")
    print("|---|---:|---|---:|---:|---:|")
    for round_ in range(1, args.rounds + 1):
        for name, tree in trees:
            with (
                repository_copy(ROOT / "models", "detect", max_queue_size=1) as repository,
                volley_running(repository, tree=tree) as volley,
            ):
                for protocol in ("http", "grpc"):
                    answers, refused, cpu = uvloop.run(
                        measure(volley.proc.pid, volley.http, volley.grpc, protocol, args.seconds)
                    )
                    share, per_answer = refused / answers, cpu / answers * 1e6
                    print(
                        f"| {name} | {round_} | {protocol} | {answers / args.seconds:,.0f} | "
                        f"{share:.1%} | {per_answer:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
