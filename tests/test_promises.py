"""Promises the docs make, each held on a real server against ONNX Runtime's own answers.

- Every datatype docs/model-config.md lists round-trips over HTTP JSON, HTTP binary and gRPC.
- `default_timeout_us` fails requests that queue too long: HTTP 504 / gRPC DEADLINE_EXCEEDED.
- A configured warmup keeps the model, and the server, not ready until it has run.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_models
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving
from reference import ort_outputs
from tritonclient.utils import InferenceServerException

TIMEOUT = 60  # seconds per call: generous, the machine is shared
DEFAULT_TIMEOUT_US = 200_000
SLOW_WIDTH = 512


def seconds_per_run(model_file: Path) -> float:
    """How long one batch-1 run of a `slow` model takes here on one CPU thread (best of 3)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.zeros((1, SLOW_WIDTH), np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return min(times)


def timed_slow(path: Path, seconds: float) -> Path:
    """The `slow` model with as many iterations as make one batch-1 run on one CPU thread take
    about `seconds` on this machine."""
    probe = 500
    onnx_models.slow(path, iterations=probe, width=SLOW_WIDTH)
    iterations = max(probe, math.ceil(probe * seconds / seconds_per_run(path)))
    return onnx_models.slow(path, iterations=iterations, width=SLOW_WIDTH)


# One CPU thread, so a run takes as long on every machine as `timed_slow` measured.
ON_ONE_CPU_THREAD = {"execution_providers": ["cpu"], "intra_op_threads": 1}


@pytest.fixture(scope="module")
def promised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VolleyProcess, Path]]:
    """A server with `every_datatype` and `deadline` (one request at a time, about a second
    each, queued requests time out after `DEFAULT_TIMEOUT_US`)."""
    root = tmp_path_factory.mktemp("promises") / "models"
    onnx_models.every_datatype(root / "every_datatype" / "1" / "model.onnx")
    onnx_models.write_config(root / "every_datatype", {"max_batch_size": 8, "dynamic_batching": {}})
    timed_slow(root / "deadline" / "1" / "model.onnx", seconds=1.0)
    onnx_models.write_config(
        root / "deadline",
        {"max_batch_size": 1, "dynamic_batching": {"default_timeout_us": DEFAULT_TIMEOUT_US},
         "warmup": {"count": 0}, **ON_ONE_CPU_THREAD},
    )  # fmt: skip
    with serving(root, "--metrics-port", "0") as proc:
        yield proc, root


# --- every documented datatype --------------------------------------------------------------


def datatype_feeds() -> dict[str, np.ndarray]:
    """Two distinct rows per datatype, with each type's extremes."""
    values = {
        "BOOL": [[True, False, True], [False, False, True]],
        "UINT8": [[0, 255, 7], [1, 128, 254]],
        "UINT16": [[0, 65535, 300], [1, 32768, 65534]],
        "UINT32": [[0, 2**32 - 1, 70000], [1, 2**31, 2**32 - 2]],
        "UINT64": [[0, 2**64 - 1, 2**40 + 3], [1, 2**63, 2**64 - 2]],
        "INT8": [[-128, 127, 0], [-1, 1, 100]],
        "INT16": [[-32768, 32767, 0], [-1, 1, 1000]],
        "INT32": [[-(2**31), 2**31 - 1, 0], [-1, 1, 123456]],
        "INT64": [[-(2**63), 2**63 - 1, 0], [-1, 1, 2**40]],
        "FP16": [[-65504.0, 0.333, 6.1e-5], [1.0, -2.5, 1024.0]],
        "FP32": [[1 / 3, -1.0e30, 1.5e-38], [3.4e38, 0.1, 2.0]],
        "FP64": [[1 / 3, -1.0e300, 2.0**-1000], [1.7e308, 0.1, -5.0]],
        "BYTES": [["héllo", "", "a b"], ["日本", "x", "longer text"]],
    }
    dtypes = {v2: dtype for v2, _, dtype in onnx_models.EVERY_DATATYPE}
    assert set(values) == set(dtypes)
    return {v2: np.array(rows, dtype=dtypes[v2]) for v2, rows in values.items()}


def infer_every_datatype(proc: VolleyProcess, wire: str, feeds: dict[str, np.ndarray]):
    """One request with every datatype over `wire`; returns the client's result."""
    if wire == "grpc":
        client = grpcclient.InferenceServerClient(proc.grpc)
        inputs = []
        for v2, value in feeds.items():
            inputs.append(grpcclient.InferInput(v2.lower(), list(value.shape), v2))
            inputs[-1].set_data_from_numpy(value)
        try:
            return client.infer("every_datatype", inputs, client_timeout=TIMEOUT)
        finally:
            client.close()
    binary = wire == "http-binary"
    client = httpclient.InferenceServerClient(proc.http, network_timeout=TIMEOUT)
    inputs, outputs = [], []
    for v2, value in feeds.items():
        inputs.append(httpclient.InferInput(v2.lower(), list(value.shape), v2))
        inputs[-1].set_data_from_numpy(value, binary_data=binary)
        outputs.append(httpclient.InferRequestedOutput(f"{v2.lower()}_out", binary_data=binary))
    try:
        return client.infer("every_datatype", inputs, outputs=outputs)
    finally:
        client.close()


def text(array: np.ndarray) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else x for x in array.ravel()]


@pytest.mark.parametrize("wire", ["http-json", "http-binary", "grpc"])
def test_every_documented_datatype_round_trips(promised, wire: str) -> None:
    proc, root = promised
    feeds = datatype_feeds()
    result = infer_every_datatype(proc, wire, feeds)
    model = root / "every_datatype" / "1" / "model.onnx"
    want = ort_outputs(model, {v2.lower(): value for v2, value in feeds.items()})
    for v2, value in feeds.items():
        got, expected = result.as_numpy(f"{v2.lower()}_out"), want[f"{v2.lower()}_out"]
        assert got is not None and got.shape == value.shape, v2
        if v2 == "BYTES":
            assert text(got) == text(expected) == text(value[:, ::-1])
            continue
        assert got.dtype == expected.dtype == value.dtype, v2
        np.testing.assert_array_equal(got, expected, err_msg=v2)
        np.testing.assert_array_equal(got, value[:, ::-1], err_msg=v2)


# --- default_timeout_us ---------------------------------------------------------------------


def deadline_request(proc: VolleyProcess, protocol: str, barrier: threading.Barrier):
    """One `deadline` request sent when all callers are at `barrier`; (status, message)."""
    x = np.full((1, SLOW_WIDTH), 0.1, np.float32)
    if protocol == "http":
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, SLOW_WIDTH],
                            "data": x.ravel().tolist()}]}  # fmt: skip
        barrier.wait(TIMEOUT)
        response = requests.post(f"{proc.url}/v2/models/deadline/infer", json=body, timeout=TIMEOUT)
        return str(response.status_code), response.json().get("error", "")
    client = grpcclient.InferenceServerClient(proc.grpc)
    try:
        tensor = grpcclient.InferInput("x", [1, SLOW_WIDTH], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.is_server_live()  # connected before the burst
        barrier.wait(TIMEOUT)
        try:
            client.infer("deadline", [tensor])  # no client deadline: the default applies
        except InferenceServerException as exc:
            return exc.status(), exc.message()
        return "OK", ""
    finally:
        client.close()


@pytest.mark.parametrize(
    "protocol,ok,timed_out",
    [("http", "200", "504"), ("grpc", "OK", "StatusCode.DEADLINE_EXCEEDED")],
)
def test_default_timeout_fails_requests_that_queue_too_long(
    promised, protocol: str, ok: str, timed_out: str
) -> None:
    """`deadline` runs one request at a time for about a second and lets requests that give
    no timeout queue 0.2 s: of three sent together, one runs and the two that queue time out."""
    proc, _ = promised
    count = 3
    barrier = threading.Barrier(count)
    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(lambda _: deadline_request(proc, protocol, barrier), range(3)))
    statuses = [status for status, _ in outcomes]
    assert sorted(statuses) == sorted([ok] + [timed_out] * (count - 1)), outcomes
    for status, message in outcomes:
        if status == timed_out:
            assert message == (
                f"request timed out after {DEFAULT_TIMEOUT_US} us in the queue of model 'deadline'"
            )


# --- warmup gates readiness -----------------------------------------------------------------


def status(url: str) -> int:
    return requests.get(url, timeout=TIMEOUT).status_code


def test_configured_warmup_gates_readiness(tmp_path: Path) -> None:
    """A model whose configured warmup takes about 2 s of compute is not ready, and neither is
    the server, until the warmup has run. The model is loaded on request, so the test sees
    loading begin; from then on nothing may look ready for at least a quarter of the warmup's
    compute."""
    root = tmp_path / "models"
    per_run, runs = 0.25, 8
    timed_slow(root / "warm" / "1" / "model.onnx", seconds=per_run)
    onnx_models.write_config(
        root / "warm", {"max_batch_size": 1, "warmup": {"count": runs}, **ON_ONE_CPU_THREAD}
    )
    with serving(root, "--model-control", "explicit", "--metrics-port", "0") as proc:
        proc.wait_ready()  # with nothing to load, "ready" is logged before HTTP listens
        # Polled server first, then model: the two turn ready together, so a poll that straddles
        # that moment reads [server 503, model 200]. A server that turned ready before its model
        # would read [200, 503], which no phase allows.
        urls = (f"{proc.url}/v2/health/ready", f"{proc.url}/v2/models/warm/ready")
        assert [status(u) for u in urls] == [200, 503]  # nothing asked for yet
        seen: list[tuple[float, list[int]]] = []
        with ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            load = pool.submit(
                requests.post, f"{proc.url}/v2/repository/models/warm/load", timeout=TIMEOUT
            )
            while not load.done():
                seen.append((time.monotonic() - start, [status(u) for u in urls]))
                time.sleep(0.05)  # polling interval only: no event is ordered by it
            assert load.result().status_code == 200, load.result().text
        seen.append((time.monotonic() - start, [status(u) for u in urls]))
    assert seen[-1][1] == [200, 200]
    # Until the server takes the load request nothing has changed ([200, 503]); then neither the
    # server nor the model is ready ([503, 503]) until the warmup has run; then both are. (The
    # first samples may come before the request reaches the server: CI once saw one.)
    phases = [[200, 503], [503, 503], [503, 200], [200, 200]]
    assert all(s in phases for _, s in seen), seen
    ranks = [phases.index(s) for _, s in seen]
    assert ranks == sorted(ranks), seen
    assert ranks.count(2) <= 1, seen  # straddling the moment both turn ready happens once at most
    gated = [t for t, s in seen if s == [503, 503]]
    assert gated and gated[-1] - gated[0] >= 0.25 * per_run * runs, seen  # margin for a busy box
