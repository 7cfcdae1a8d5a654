"""Graceful shutdown: SIGTERM drains queued and running requests, refuses new ones, exits 0."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_models
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess
from reference import assert_close
from tritonclient.utils import InferenceServerException

TIMEOUT = 60  # seconds: the machine is shared with training jobs
WIDTH = 512  # the slow model's row width


def inflight(proc: VolleyProcess) -> dict[str, float]:
    """`volley_inflight_requests` by protocol, from the HTTP port's /metrics."""
    text = requests.get(proc.url + "/metrics", timeout=TIMEOUT).text
    out = {}
    for line in text.splitlines():
        if line.startswith("volley_inflight_requests{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('"')[1]] = float(value)
    return out


@pytest.fixture
def repository_with_queue(tmp_path: Path) -> Path:
    """slow (~300 ms a request, one at a time, a queue of 32) and the fast mlp."""
    root = tmp_path / "models"
    onnx_models.slow(root / "slow" / "1" / "model.onnx", iterations=30000)
    onnx_models.write_config(
        root / "slow",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 32}, "intra_op_threads": 1},
    )
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", hidden=32)
    return root


@pytest.fixture
def volley(repository_with_queue: Path) -> Iterator[VolleyProcess]:
    proc = VolleyProcess(repository_with_queue, "--metrics-port", "0")
    try:
        proc.wait_models()
        yield proc
    finally:
        proc.stop()


def slow_http(proc: VolleyProcess, value: float) -> requests.Response:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH], "data": [value] * WIDTH}]
    }
    return requests.post(proc.url + "/v2/models/slow/infer", json=body, timeout=TIMEOUT)


def slow_grpc(proc: VolleyProcess, value: float) -> np.ndarray:
    client = grpcclient.InferenceServerClient(proc.grpc)
    try:
        tensor = grpcclient.InferInput("x", [1, WIDTH], "FP32")
        tensor.set_data_from_numpy(np.full((1, WIDTH), value, np.float32))
        return client.infer("slow", [tensor], client_timeout=TIMEOUT).as_numpy("y")
    finally:
        client.close()


def slow_reference(model_file: Path, values: list[float]) -> dict[float, np.ndarray]:
    """ONNX Runtime's own answer for a row of each value, computed as the server computes it
    (one row at a time on one thread), two rows at once (the machine has two cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def run(value: float) -> np.ndarray:
        return session.run(["y"], {"x": np.full((1, WIDTH), value, np.float32)})[0]

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(values, pool.map(run, values), strict=True))


def mlp_body() -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0] * 32}]}


def test_sigterm_drains_queued_requests(volley: VolleyProcess, repository_with_queue: Path) -> None:
    proc = volley
    http_count, grpc_count = 6, 2
    # every request sends its own value, so each answer can be told from the others
    http_values = [(i + 1) / 10 for i in range(http_count)]
    grpc_values = [-(i + 1) / 10 for i in range(grpc_count)]

    with ThreadPoolExecutor(http_count + grpc_count) as pool:
        http: list[Future] = []
        grpc: list[Future] = []
        for i in range(max(http_count, grpc_count)):
            if i < http_count:
                http.append(pool.submit(slow_http, proc, http_values[i]))
            if i < grpc_count:
                grpc.append(pool.submit(slow_grpc, proc, grpc_values[i]))
        # every request has reached the server (one running, the rest queued) before the signal
        deadline = time.monotonic() + TIMEOUT
        while True:
            # done-ness before the gauge, so that no request is counted twice
            done = {"http": sum(f.done() for f in http), "grpc": sum(f.done() for f in grpc)}
            gauge = inflight(proc)
            if all(
                gauge.get(k, 0) + done[k] >= n
                for k, n in (("http", http_count), ("grpc", grpc_count))
            ):
                break
            assert time.monotonic() < deadline, gauge
            time.sleep(0.01)

        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)

        # readiness turns false at once, while the queue is still being worked off
        deadline = time.monotonic() + TIMEOUT
        while True:
            ready = requests.get(proc.url + "/v2/health/ready", timeout=TIMEOUT)
            if ready.status_code != 200:
                break
            assert time.monotonic() < deadline, "readiness never turned false"
            time.sleep(0.01)
        assert ready.json()["ready"] is False
        assert requests.get(proc.url + "/v2/health/live", timeout=TIMEOUT).status_code == 200

        # new work is refused during the drain, on both protocols
        response = requests.post(
            proc.url + "/v2/models/mlp/infer", json=mlp_body(), timeout=TIMEOUT
        )
        assert response.status_code == 503, response.text
        assert response.json() == {"error": "server is shutting down"}
        assert response.headers["retry-after"] == "1"
        response = slow_http(proc, 1.0)
        assert response.status_code == 503, response.text
        client = grpcclient.InferenceServerClient(proc.grpc)
        try:
            assert client.is_server_ready() is False
            tensor = grpcclient.InferInput("input", [1, 32], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 32), np.float32))
            with pytest.raises(InferenceServerException) as info:
                client.infer("mlp", [tensor], client_timeout=TIMEOUT)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert "server is shutting down" in info.value.message()
        finally:
            client.close()
        # all of that happened during the drain: requests sent before the signal were still open
        assert not all(f.done() for f in http + grpc), "drain ended before the checks"

        # every request sent before the signal is answered
        answers: dict[float, np.ndarray] = {}
        for value, future in zip(http_values, http, strict=True):
            response = future.result(TIMEOUT)
            assert response.status_code == 200, response.text
            (out,) = response.json()["outputs"]
            assert out["shape"] == [1, WIDTH]
            answers[value] = np.array(out["data"], np.float32).reshape(1, WIDTH)
        for value, future in zip(grpc_values, grpc, strict=True):
            answers[value] = future.result(TIMEOUT)

    code = proc.proc.wait(TIMEOUT)
    elapsed = time.monotonic() - signalled
    assert code == 0, proc.log()
    assert elapsed < 30, elapsed
    log = proc.log()
    assert log.index('"event":"draining"') < log.index('"event":"stopped"')
    assert "Traceback" not in log

    # ... and answered right: each equals ONNX Runtime's own answer for its value, and no two
    # answers are alike (a drain that answered with another request's rows would show)
    expected = slow_reference(repository_with_queue / "slow" / "1" / "model.onnx", list(answers))
    for value, answer in answers.items():
        assert answer.shape == (1, WIDTH)
        assert_close(answer, expected[value])
    rows = np.concatenate(list(expected.values()))
    gaps = np.abs(rows[:, None, :] - rows[None, :, :]).max(axis=-1)
    assert gaps[~np.eye(len(rows), dtype=bool)].min() > 1e-3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_server_exits_promptly(volley: VolleyProcess, sig: signal.Signals) -> None:
    proc = volley
    response = requests.post(proc.url + "/v2/models/mlp/infer", json=mlp_body(), timeout=TIMEOUT)
    assert response.status_code == 200
    started = time.monotonic()
    proc.proc.send_signal(sig)
    assert proc.proc.wait(TIMEOUT) == 0, proc.log()
    assert time.monotonic() - started < 10
    with pytest.raises(requests.ConnectionError):
        requests.get(proc.url + "/v2/health/live", timeout=5)


def test_shutdown_timeout_bounds_the_drain(tmp_path: Path) -> None:
    """`--shutdown-timeout 1` with several seconds of queued work: the server stops waiting
    after about a second, answers what is left with 503, and exits 0."""
    root = tmp_path / "models"
    onnx_models.slow(root / "slow" / "1" / "model.onnx", iterations=60000)  # ~600 ms a request
    onnx_models.write_config(
        root / "slow",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 64}, "intra_op_threads": 1},
    )
    proc = VolleyProcess(root, "--metrics-port", "0", "--shutdown-timeout", "1")
    count = 12  # over 7 s of work on an idle machine
    bound = 4.5  # seconds: the timeout, the batch already running, and the listeners closing

    def one(value: float) -> requests.Response | str:
        try:
            return slow_http(proc, value)
        except requests.RequestException as exc:  # a dropped connection is a lost request
            return repr(exc)

    try:
        proc.wait_models()
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(one, i / count) for i in range(count)]
            deadline = time.monotonic() + TIMEOUT
            while inflight(proc).get("http", 0) < count:
                assert time.monotonic() < deadline, inflight(proc)
                time.sleep(0.01)
            signalled = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            try:
                code = proc.proc.wait(bound)
            except subprocess.TimeoutExpired:
                proc.proc.kill()
                pytest.fail(f"still draining {bound}s after SIGTERM with --shutdown-timeout 1")
            elapsed = time.monotonic() - signalled
            results = [f.result(TIMEOUT) for f in futures]
    finally:
        proc.stop()
    assert code == 0, proc.log()
    assert elapsed < bound
    lost = [r for r in results if isinstance(r, str)]
    assert not lost, lost[:3]
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for response in results:
        if response.status_code == 503:
            assert "shutting down" in response.json()["error"]
