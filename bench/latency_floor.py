"""One request at a time: Volley against servers that only answer canned bytes (issue 15, c=1).

Issue 15 asks that at concurrency 1 Volley's p50 add at most 0.3 ms to in-process ONNX Runtime
(HTTP binary and gRPC, under perf_analyzer). Part of any server's p50 is not its own work: the
load generator, the loopback round trip and the wake-ups on both sides. This benchmark measures
that part on the same machine in the same run, with two bare servers that answer every request
with bytes Volley gave for it, without decoding anything:

- HTTP/1.1: httptools (the parser uvicorn and Volley use) on uvloop, with the answer of each
  method and path fetched once from Volley and then replayed;
- gRPC: Volley's own HTTP/2 server with handlers that return captured bytes
  (`bench/grpc_floor.py`'s `bare-volley`).

Each round measures, in turn, the in-process ceiling (`session.run` on one row in a loop),
both bare servers and Volley as shipped (the shipped fraud config, default flags), each under
perf_analyzer at c=1 for `--seconds`. Volley's own share is its p50 minus the bare server's.

    python bench/latency_floor.py [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_floor import capture, start_bare
from serving import (
    ROOT,
    ceiling,
    free_port,
    machine,
    perf_analyzer,
    repository_copy,
    start_volley,
    stop,
    wait_for,
)

KEPT_HEADERS = ("content-type", "inference-header-content-length")
CEILING = "in-process ORT (ceiling)"
BARE = {  # protocol -> the bare server's row
    "HTTP binary": "bare HTTP/1.1 (canned bytes)",
    "gRPC": "bare gRPC (Volley's HTTP/2 server, canned bytes)",
}


def serve_bare_http(port: int, upstream: str) -> int:
    """Answer each request with the bytes `upstream` gave for its method and path (asked once)."""
    import httptools
    import uvloop

    answers: dict[tuple[bytes, bytes], bytes] = {}

    def ask_upstream(method: bytes, url: bytes, headers: dict, body: bytes) -> bytes:
        connection = http.client.HTTPConnection(upstream, timeout=10)
        connection.request(method.decode(), url.decode(), body, headers)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        head = [f"HTTP/1.1 {response.status} {response.reason}".encode()]
        for name in KEPT_HEADERS:
            if (value := response.getheader(name)) is not None:
                head.append(f"{name}: {value}".encode())
        head.append(f"content-length: {len(payload)}".encode())
        return b"\r\n".join(head) + b"\r\n\r\n" + payload

    class Bare(asyncio.Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url, self.headers, self.body = b"", {}, []

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode()] = value.decode()

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            key = (self.parser.get_method(), self.url)
            answer = answers.get(key)
            if answer is None:  # the first of its kind only: perf_analyzer's warm-up
                answer = answers[key] = ask_upstream(*key, self.headers, b"".join(self.body))
            self.transport.write(answer)
            self.url, self.headers, self.body = b"", {}, []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Bare, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(run())
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--bare-http":
        return serve_bare_http(int(sys.argv[2]), sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=3.0, help="per perf_analyzer window")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_file = args.models / "fraud" / "1" / "model.onnx"
    with repository_copy(args.models, "fraud") as repository, tempfile.TemporaryDirectory() as tmp:
        answers_file = Path(tmp) / "answers.pickle"
        volley = start_volley(repository)
        http_port, grpc_port = free_port(), free_port()
        bare: list[subprocess.Popen] = []
        try:
            capture(volley.grpc, answers_file)
            bare.append(start_bare("volley", grpc_port, answers_file))
            cmd = [sys.executable, __file__, "--bare-http", str(http_port), volley.http]
            bare.append(subprocess.Popen(cmd))
            wait_for(f"http://127.0.0.1:{http_port}/v2/health/ready")
            loads = {
                BARE["HTTP binary"]: (f"127.0.0.1:{http_port}", "http"),
                "Volley, HTTP binary": (volley.http, "http"),
                BARE["gRPC"]: (f"127.0.0.1:{grpc_port}", "grpc"),
                "Volley, gRPC": (volley.grpc, "grpc"),
            }
            p50s: dict[str, list[float]] = {CEILING: []}
            p50s.update({name: [] for name in loads})
            for round_ in range(1, args.rounds + 1):
                p50s[CEILING].append(ceiling(model_file, args.seconds)[0].p50_ms)
                for name, (url, protocol) in loads.items():
                    # -x 1 names the version: the bare gRPC server answers without reading
                    _, p50, _ = perf_analyzer("fraud", url, protocol, 1, ["-x", "1"], args.seconds)
                    p50s[name].append(p50)
                line = ", ".join(f"{name} {values[-1]:.3f}" for name, values in p50s.items())
                print(f"  round {round_}: {line}", file=sys.stderr, flush=True)
        finally:
            for process in bare:
                process.kill()
                process.wait()
            stop(volley.proc)
    print(report(p50s, args))
    return 0


def report(p50s: dict[str, list[float]], args: argparse.Namespace) -> str:
    """The table of p50s per round and the c=1 target read against the bare servers."""
    rounds = len(next(iter(p50s.values())))
    lines = [
        f"Machine: {machine()}",
        f"fraud, one row per request, perf_analyzer c=1, {args.seconds:g} s windows, "
        f"{rounds} rounds in turn",
        "",
        "| p50 ms | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | median |",
        "|---|" + "---:|" * (rounds + 1),
    ]
    median = {name: statistics.median(values) for name, values in p50s.items()}
    for name, values in p50s.items():
        cells = " | ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {name} | {cells} | {median[name]:.3f} |")
    top = median[CEILING]
    lines += ["", "Target: p50 <= ceiling + 0.3 ms (medians):"]
    for protocol, bare in BARE.items():
        served, floor = median[f"Volley, {protocol}"], median[bare]
        verdict = "met" if served - top <= 0.3 else "NOT MET"
        lines.append(
            f"- Volley, {protocol}: {served:.3f} ms = ceiling + {served - top:.3f} ms ({verdict}); "
            f"the bare server alone {floor:.3f} ms, so Volley's own work adds "
            f"{served - floor:.3f} ms and the ceiling leaves it {top + 0.3 - floor:.3f} ms"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
