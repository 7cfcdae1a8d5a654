"""Where a gRPC call's time goes: Volley's own `ModelInfer` against stand-ins that do less.

Each row starts Volley on the fraud model (the peer benchmark's batching: 100 us queue delay,
two single-thread instances) with `ModelInfer` replaced by a stand-in, then drives it with
perf_analyzer over gRPC at concurrency 64 (`--concurrency`):

- `canned`: answers a prebuilt response at once (grpc.aio's own cost per call: the floor);
- `decode`: decodes the request into numpy first (adds the codec);
- `loop-hop`: also waits once on a future the event loop resolves (a suspended handler);
- `thread-hop`: the future is resolved by a worker thread instead, in one callback per burst
  (the shape of the batcher's hand-back, without ONNX Runtime);
- `volley`: the real `ModelInfer`.

Two more rows leave Volley out: a bare grpcio server that answers every method with bytes
Volley gave for it (captured in the same run), no protobuf decoding, no servicer class:

- `bare-aio`: grpcio's asyncio server (what Volley was built on until session 11);
- `bare-sync`: grpcio's thread-pool server (16 threads), the other server grpcio offers;
- `bare-volley`: Volley's own gRPC server (`server/grpc_server.py`), what Volley runs on now.

    python bench/grpc_floor.py [--seconds 4]

The last column is the mean number of requests per detector batch, from the model's statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import queue
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import requests
from serving import (
    ROOT,
    free_port,
    machine,
    perf_analyzer,
    repository_copy,
    start_volley,
    stop,
    volley_running,
)

VARIANTS = (
    "canned", "decode", "loop-hop", "thread-hop", "volley", "bare-aio", "bare-sync", "bare-volley"
)  # fmt: skip
SERVICE = "/inference.GRPCInferenceService/"


def patch(variant: str) -> None:
    """Replace `InferenceServicer.ModelInfer` in this process by the stand-in `variant`."""
    from tritonclient.grpc import service_pb2 as pb

    from server import grpc_api
    from server.protocol import grpc_codec

    canned = pb.ModelInferResponse(model_name="fraud", model_version="1")
    canned.outputs.add(name="score", datatype="FP32", shape=[1, 1])
    canned.raw_output_contents.append(np.zeros(1, np.float32).tobytes())
    handbacks: queue.SimpleQueue = queue.SimpleQueue()

    def hand_back() -> None:
        while True:
            burst = [handbacks.get()]
            while not handbacks.empty():
                burst.append(handbacks.get())
            burst[0][0].call_soon_threadsafe(_resolve, [future for _, future in burst])

    async def model_infer(self, request, context):
        if variant != "canned":
            grpc_codec.decode_request(request)
        if variant in ("loop-hop", "thread-hop"):
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            if variant == "loop-hop":
                loop.call_soon(future.set_result, None)
            else:
                handbacks.put((loop, future))
            await future
        return canned

    if variant == "thread-hop":
        threading.Thread(target=hand_back, daemon=True).start()
    if variant != "volley":
        grpc_api.InferenceServicer.ModelInfer = model_infer


def _resolve(futures: list[asyncio.Future]) -> None:
    for future in futures:
        future.set_result(None)


def serve(variant: str, argv: list[str]) -> int:
    """`volley serve argv` with the stand-in in place (the server side of one row)."""
    sys.path.insert(0, str(ROOT))
    patch(variant)
    from server.cli import main

    return main(["serve", *argv])


def row(variant: str, repository: Path, seconds: float, concurrency: int) -> str:
    """One table row: serve `repository` with the stand-in `variant`, load it, stop it."""
    volley = start_volley(repository, serve=(__file__, "--serve", variant))
    try:
        # -x 1: name the version, as the stand-ins answer without checking the request
        rps, p50, p99 = perf_analyzer(
            "fraud", volley.grpc, "grpc", concurrency, ["-x", "1"], seconds
        )
        stats = requests.get(f"http://{volley.http}/v2/models/fraud/stats", timeout=5).json()
    finally:
        stop(volley.proc)
    model = stats["model_stats"][0]
    rows = model["inference_count"] / model["execution_count"] if model["execution_count"] else 0
    batch = f"{rows:.1f}" if rows else "-"
    return f"| {variant} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {batch} |"


def capture(address: str, answers_file: Path) -> None:
    """The answers of the Volley at gRPC `address` to what perf_analyzer asks (metadata,
    config, one inference), as bytes."""
    from tritonclient.grpc import service_pb2 as pb

    requests_by_method = {
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelReady": pb.ModelReadyRequest(name="fraud"),
        "ModelMetadata": pb.ModelMetadataRequest(name="fraud"),
        "ModelConfig": pb.ModelConfigRequest(name="fraud"),
        "ModelStatistics": pb.ModelStatisticsRequest(name="fraud"),
        "SystemSharedMemoryStatus": pb.SystemSharedMemoryStatusRequest(),
        "SystemSharedMemoryUnregister": pb.SystemSharedMemoryUnregisterRequest(),
        "CudaSharedMemoryStatus": pb.CudaSharedMemoryStatusRequest(),
        "CudaSharedMemoryUnregister": pb.CudaSharedMemoryUnregisterRequest(),
    }
    infer = pb.ModelInferRequest(model_name="fraud")
    infer.inputs.add(name="features", datatype="FP32", shape=[1, 17])
    infer.raw_input_contents.append(np.zeros(17, np.float32).tobytes())
    requests_by_method["ModelInfer"] = infer
    with grpc.insecure_channel(address) as channel:
        answers = {
            SERVICE + method: channel.unary_unary(SERVICE + method)(
                request.SerializeToString(), timeout=10
            )
            for method, request in requests_by_method.items()
        }
    answers_file.write_bytes(pickle.dumps(answers))


def serve_bare(kind: str, port: int, answers_file: Path) -> int:
    """A bare server (grpcio asyncio or thread pool, or Volley's) answering every known method
    with its captured bytes."""
    answers = pickle.loads(answers_file.read_bytes())

    def handler(answer: bytes) -> grpc.RpcMethodHandler:
        async def async_answer(request: bytes, context: object) -> bytes:
            return answer

        def sync_answer(request: bytes, context: object) -> bytes:
            return answer

        function = async_answer if kind == "aio" else sync_answer
        return grpc.unary_unary_rpc_method_handler(function, lambda b: b, lambda b: b)

    handlers = {method: handler(answer) for method, answer in answers.items()}
    generic = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        method.removeprefix(SERVICE): h for method, h in handlers.items()
    })  # fmt: skip
    if kind == "volley":
        return _serve_bare_volley(port, answers)
    if kind == "aio":
        import uvloop

        async def run() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((generic,))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            await server.wait_for_termination()

        uvloop.run(run())
    else:
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        server.add_generic_rpc_handlers((generic,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
    return 0


def _serve_bare_volley(port: int, answers: dict[str, bytes]) -> int:
    """Volley's gRPC server with handlers that return the captured bytes."""
    import uvloop

    sys.path.insert(0, str(ROOT))
    from server.grpc_server import GrpcServer, Method

    def method(answer: bytes) -> Method:
        async def answer_at_once(request: bytes, context: object) -> bytes:
            return answer

        return Method(answer_at_once, bytes, bytes)

    async def run() -> None:
        server = GrpcServer({path: method(a) for path, a in answers.items()}, 64 << 20)
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(run())
    return 0


def start_bare(kind: str, port: int, answers_file: Path) -> subprocess.Popen:
    """A bare server (`aio`, `sync` or `volley`) on `port`, once it accepts calls."""
    cmd = [sys.executable, __file__, "--bare", kind, str(port), str(answers_file)]
    server = subprocess.Popen(cmd)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
    except BaseException:
        server.kill()
        server.wait()
        raise
    return server


def bare_row(kind: str, answers_file: Path, seconds: float, concurrency: int) -> str:
    """One row for a bare server (`aio`, `sync` or `volley`)."""
    port = free_port()
    server = start_bare(kind, port, answers_file)
    try:
        rps, p50, p99 = perf_analyzer(
            "fraud", f"127.0.0.1:{port}", "grpc", concurrency, ["-x", "1"], seconds
        )
    finally:
        server.kill()
        server.wait()
    return f"| bare-{kind} (canned bytes, no servicer) | {rps:,.0f} | {p50:.2f} | {p99:.2f} | - |"


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], sys.argv[3:])
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        return serve_bare(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=4.0, help="per perf_analyzer window")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--concurrency", type=int, default=64, help="perf_analyzer's")
    args = parser.parse_args()
    batching = {"max_queue_delay_us": 100, "max_queue_size": 4096}
    lines = [
        f"Machine: {machine()}",
        f"fraud, single-row requests, perf_analyzer gRPC c={args.concurrency}",
        "",
        "| ModelInfer | req/s | p50 ms | p99 ms | requests per batch |",
        "|---|---:|---:|---:|---:|",
    ]
    with repository_copy(
        args.models, "fraud", dynamic_batching=batching, instance_count=2, intra_op_threads=1
    ) as repository:
        answers_file = repository.parent / "answers.pickle"
        for variant in args.variants.split(","):
            if variant.startswith("bare-"):
                if not answers_file.exists():
                    with volley_running(repository) as volley:
                        capture(volley.grpc, answers_file)
                kind = variant.removeprefix("bare-")
                lines.append(bare_row(kind, answers_file, args.seconds, args.concurrency))
            else:
                lines.append(row(variant, repository, args.seconds, args.concurrency))
            print(f"  {lines[-1]}", file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
