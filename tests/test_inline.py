"""A lone request to an idle fast model runs on the event loop; concurrent requests are batched
(on the instance thread, or with `inline_batches` on the loop).

`docs/batching.md`, rule 6: a one-row request that is the only request the server holds, to a
model whose one-row runs are measured fast, runs at once on the loop instead of going through
the instance thread. Seen from outside through `volley_batch_releases_total{reason}`: alone,
requests run `inline`; many at once, they are batched as before; and requests that end badly
(clients gone mid-body, cancelled calls, cut streams) do not leave the server thinking it is busy.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving
from metrics_scrape import scrape, total
from reference import assert_close, ort_outputs

TIMEOUT = 60
WARM = 16  # one-row runs measured on the instance thread before any runs inline


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VolleyProcess, Path]]:
    """The mlp with no queue delay; a generous `inline_max_us`, so that a slow CI machine's
    runs still count as fast (what is tested is when a request runs inline, not the bound)."""
    root = tmp_path_factory.mktemp("inline") / "models"
    model = onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    onnx_models.write_config(
        root / "mlp",
        {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 0},
         "inline_max_us": 20000},
    )  # fmt: skip
    with serving(root) as proc:
        yield proc, model


@pytest.fixture(scope="module")
def fast_batches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VolleyProcess, Path]]:
    """`fast`, with `inline_batches`: requests read together run as batches on the loop."""
    root = tmp_path_factory.mktemp("inline-batches") / "models"
    model = onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    onnx_models.write_config(
        root / "mlp",
        {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 0},
         "inline_max_us": 20000, "inline_batches": True},
    )  # fmt: skip
    with serving(root) as proc:
        yield proc, model


def releases(proc: VolleyProcess) -> dict[str, float]:
    samples = scrape(f"{proc.url}/metrics")
    return {
        reason: total(samples, "volley_batch_releases_total", model="mlp", reason=reason)
        for reason in ("immediate", "inline")
    }


def lone_requests(proc: VolleyProcess, model: Path, count: int) -> None:
    """`count` requests one after another, half over HTTP, half over gRPC, answers checked."""
    x = np.random.default_rng(count).standard_normal((1, 32)).astype(np.float32)
    expected = ort_outputs(model, {"input": x})["score"]
    with (
        httpclient.InferenceServerClient(proc.http) as http,
        grpcclient.InferenceServerClient(proc.grpc) as grpc,
    ):
        for i in range(count):
            lib, client = (httpclient, http) if i % 2 else (grpcclient, grpc)
            tensor = lib.InferInput("input", [1, 32], "FP32")
            tensor.set_data_from_numpy(x)
            assert_close(client.infer("mlp", [tensor]).as_numpy("score"), expected)


async def burst(proc: VolleyProcess, model: Path, count: int) -> None:
    """`count` one-row gRPC requests at once, each with its own row, each answer checked."""
    client = grpcaio.InferenceServerClient(proc.grpc)
    xs = np.random.default_rng(count).standard_normal((count, 1, 32)).astype(np.float32)

    async def one(x: np.ndarray) -> np.ndarray:
        tensor = grpcaio.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)
        return (await client.infer("mlp", [tensor])).as_numpy("score")

    try:
        answers = await asyncio.gather(*(one(x) for x in xs))
    finally:
        await client.close()
    for x, got in zip(xs, answers, strict=True):
        assert_close(got, ort_outputs(model, {"input": x})["score"])


def test_lone_requests_run_inline_and_concurrent_ones_are_batched(fast) -> None:
    proc, model = fast
    lone_requests(proc, model, WARM + 4)  # the first 16 are measured on the thread
    before = releases(proc)
    lone_requests(proc, model, 20)
    after = releases(proc)
    assert after["inline"] - before["inline"] == 20, (before, after)
    assert after["immediate"] == before["immediate"]

    before = releases(proc)
    asyncio.run(burst(proc, model, 200))
    after = releases(proc)
    batches = sum(after.values()) - sum(before.values())
    inline = after["inline"] - before["inline"]
    assert batches <= 100, f"{batches} batches for 200 concurrent requests"  # they were batched
    assert inline <= 20, (before, after)  # only a request that found itself alone ran inline


def test_with_inline_batches_concurrent_requests_batch_on_the_loop(fast_batches) -> None:
    """`inline_batches`: a burst of concurrent requests is still batched, and every batch is
    released `inline` (run on the loop), none `immediate` (run on the instance thread)."""
    proc, model = fast_batches
    lone_requests(proc, model, WARM + 4)
    before = releases(proc)
    asyncio.run(burst(proc, model, 200))
    after = releases(proc)
    batches = sum(after.values()) - sum(before.values())
    assert batches <= 100, f"{batches} batches for 200 concurrent requests"
    assert after["immediate"] == before["immediate"], (before, after)


def test_requests_that_end_badly_leave_the_server_idle(fast) -> None:
    """HTTP clients that leave mid-body and a gRPC stream cut with requests in it: afterwards
    a lone request still runs inline, so none of them is still counted as held."""
    proc, model = fast
    lone_requests(proc, model, WARM + 2)
    host, port = proc.http.rsplit(":", 1)
    for _ in range(5):  # a body promised and never sent
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(
                b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs"'
            )
            time.sleep(0.05)
    x = np.ones((1, 32), np.float32)
    with grpcclient.InferenceServerClient(proc.grpc) as client:
        tensor = grpcclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)
        client.start_stream(callback=lambda result, error: None)
        for i in range(50):
            client.async_stream_infer("mlp", [tensor], request_id=str(i))
        client.stop_stream(cancel_requests=True)
    time.sleep(0.5)  # the server sees the connections close
    before = releases(proc)
    lone_requests(proc, model, 6)
    after = releases(proc)
    assert after["inline"] - before["inline"] == 6, (before, after)
