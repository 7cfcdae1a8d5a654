"""Dynamic batching seen from outside: many concurrent callers, few executions, own rows back."""

from __future__ import annotations

import asyncio

import numpy as np
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from metrics_scrape import scrape, total
from reference import assert_close, ort_outputs


def _rows(i: int, batch: int) -> np.ndarray:
    """Rows that identify their request: every value encodes the request index and row."""
    base = np.arange(32, dtype=np.float32) / 32
    return np.stack([base * ((i % 17) + 1) / 10 + r for r in range(batch)]).astype(np.float32)


async def _fire(server, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    http = httpaio.InferenceServerClient(server.http, conn_limit=count)
    grpc = grpcaio.InferenceServerClient(server.grpc)

    async def one(i: int):
        x = _rows(i, 1 + i % 4)
        lib, client = (httpaio, http) if i % 2 else (grpcaio, grpc)
        inp = lib.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = await client.infer("mlp", [inp])
        return x, result.as_numpy("score")

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await http.close()
        await grpc.close()


def test_concurrent_requests_share_executions(server, repository):
    metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    labels = {"model": "mlp", "version": "2"}
    before = scrape(metrics_url)
    answers = asyncio.run(_fire(server, 200))
    after = scrape(metrics_url)

    model = repository / "mlp" / "2" / "model.onnx"
    for x, got in answers:
        assert got.shape == (x.shape[0], 1)
        assert_close(got, ort_outputs(model, {"input": x})["score"])

    def delta(name: str, **extra: str) -> float:
        return total(after, name, **labels, **extra) - total(before, name, **labels, **extra)

    requests = delta("volley_requests_total", outcome="success")
    executions = delta("volley_executions_total")
    rows = delta("volley_inferences_total")
    assert requests == 200
    assert rows == sum(x.shape[0] for x, _ in answers)
    assert executions <= requests / 4, f"{executions} executions for {requests} requests"
    assert delta("volley_batch_size_count") == executions
    assert delta("volley_requests_total", protocol="http") == 100
    assert delta("volley_requests_total", protocol="grpc") == 100


def test_requests_of_different_shapes_are_never_mixed(server):
    async def run():
        client = httpaio.InferenceServerClient(server.http, conn_limit=40)
        try:

            async def one(n: int, value: float):
                x = np.full((1, n), value, dtype=np.float32)
                inp = httpaio.InferInput("x", [1, n], "FP32")
                inp.set_data_from_numpy(x)
                result = await client.infer("rowsum", [inp])
                return n, value, result.as_numpy("total")

            jobs = [one(3 if i % 2 else 5, float(i)) for i in range(40)]
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    stats_before = _exec_count(server)
    for n, value, got in asyncio.run(run()):
        np.testing.assert_allclose(got, [[n * value]])
    executions = _exec_count(server) - stats_before
    assert 2 <= executions < 40


def _exec_count(server) -> int:
    import requests

    stats = requests.get(f"{server.url}/v2/models/rowsum/stats", timeout=5).json()
    return stats["model_stats"][0]["execution_count"]
