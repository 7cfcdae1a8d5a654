"""Faults: a killed server comes back and its clients lose nothing silently; broken model files
never replace a working version; the load API never leaves the model repository."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess, copy_shipped_models, serving
from tritonclient.utils import InferenceServerException

from clients.errors import VolleyError as ClientError
from clients.sdk import VolleyClient

TIMEOUT = 60


def fraud_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 17), np.float32)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sigkill_and_restart_loses_nothing_silently(tmp_path: Path, protocol: str) -> None:
    """A client with retries keeps calling while the server is SIGKILLed and restarted on the
    same ports: every call returns the right scores or raises; none hangs or returns junk;
    the restarted server is ready within a few seconds."""
    root = copy_shipped_models(tmp_path)
    first = VolleyProcess(root, "--metrics-port", "0")
    first.wait_models()
    ports = (first.http_port, first.grpc_port, 0)
    url = first.url if protocol == "http" else first.grpc
    expected = {}
    with VolleyClient(url, timeout=10, retries=20, backoff=0.1) as client:
        for seed in range(8):
            expected[seed] = client.infer("fraud", {"features": fraud_rows(4, seed)})["score"]
    outcomes = {"ok": 0, "error": 0, "wrong": 0}
    stop = threading.Event()

    def call_forever() -> None:
        with VolleyClient(url, timeout=10, retries=20, backoff=0.1) as client:
            i = 0
            while not stop.is_set():
                seed = i % 8
                i += 1
                try:
                    score = client.infer("fraud", {"features": fraud_rows(4, seed)})["score"]
                except ClientError:
                    outcomes["error"] += 1
                    continue
                ok = np.allclose(score, expected[seed], rtol=1e-5, atol=1e-6)
                outcomes["ok" if ok else "wrong"] += 1

    callers = [threading.Thread(target=call_forever) for _ in range(4)]
    for caller in callers:
        caller.start()
    time.sleep(1.0)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(TIMEOUT)
    killed_at = outcomes["ok"]
    restarted = time.monotonic()
    second = VolleyProcess(root, "--metrics-port", "0", ports=ports)
    try:
        second.wait_ready(TIMEOUT, path="/v2/health/ready")
        ready_after = time.monotonic() - restarted
        time.sleep(1.0)
        stop.set()
        for caller in callers:
            caller.join(TIMEOUT)
        assert not any(c.is_alive() for c in callers), "a call hung across the restart"
    finally:
        stop.set()
        second.stop()
    print(outcomes, f"ready {ready_after:.2f} s after the restart")
    assert outcomes["wrong"] == 0, outcomes
    assert outcomes["ok"] > killed_at, "no call succeeded after the restart"
    assert ready_after < 10, ready_after


@pytest.fixture
def polled(tmp_path: Path):
    """An mlp model (version 1) in a repository polled every 0.2 s."""
    root = tmp_path / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", hidden=16, seed=1)
    with serving(root, "--metrics-port", "0", "--poll-repository", "0.2") as proc:
        yield proc, root


def mlp_scores(proc: VolleyProcess, version: str = "") -> tuple[np.ndarray, str]:
    client = grpcclient.InferenceServerClient(proc.grpc)
    try:
        tensor = grpcclient.InferInput("input", [2, 32], "FP32")
        tensor.set_data_from_numpy(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32))
        result = client.infer("mlp", [tensor], model_version=version, client_timeout=TIMEOUT)
        return result.as_numpy("score"), result.get_response().model_version
    finally:
        client.close()


def keep_calling(proc: VolleyProcess, seconds: float) -> list[str]:
    """Call mlp for `seconds`; every answer's version (a failure raises)."""
    versions = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        versions.append(mlp_scores(proc)[1])
        time.sleep(0.02)
    return versions


@pytest.mark.parametrize("damage", ["garbage", "half_written", "empty"])
def test_broken_new_version_never_replaces_a_working_one(polled, damage: str) -> None:
    proc, root = polled
    before, version = mlp_scores(proc)
    assert version == "1"
    good = root.parent / "v2.onnx"
    onnx_models.mlp(good, hidden=16, seed=2)
    target = root / "mlp" / "2" / "model.onnx"
    target.parent.mkdir()
    data = good.read_bytes()
    broken = {
        "garbage": np.random.default_rng(0).bytes(len(data)),
        "half_written": data[: len(data) // 2],
        "empty": b"",
    }[damage]
    target.write_bytes(broken)
    assert set(keep_calling(proc, 1.5)) == {"1"}  # several polls: version 1 serves throughout
    np.testing.assert_array_equal(mlp_scores(proc)[0], before)
    index = requests.post(proc.url + "/v2/repository/index", timeout=TIMEOUT).json()
    assert {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in index
    # the file completed: the next poll serves it
    target.write_bytes(data)
    deadline = time.monotonic() + TIMEOUT
    while mlp_scores(proc)[1] != "2":
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.1)
    assert not np.allclose(mlp_scores(proc)[0], before)


def test_corrupted_file_of_the_serving_version_keeps_it_serving(polled) -> None:
    """The serving version's own model.onnx overwritten with garbage: the loaded session keeps
    answering, with the same scores, until a loadable file is back."""
    proc, root = polled
    before, _ = mlp_scores(proc)
    path = root / "mlp" / "1" / "model.onnx"
    original = path.read_bytes()
    path.write_bytes(b"\x08\x07not an onnx model" * 100)
    assert set(keep_calling(proc, 1.5)) == {"1"}
    np.testing.assert_array_equal(mlp_scores(proc)[0], before)
    path.write_bytes(original)
    time.sleep(0.6)
    np.testing.assert_array_equal(mlp_scores(proc)[0], before)


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory):
    """A served repository with, next to it, a valid model folder outside the repository and a
    symlink to it inside."""
    base = tmp_path_factory.mktemp("escape")
    root = copy_shipped_models(base)
    outside = base / "outside"
    onnx_models.mlp(outside / "1" / "model.onnx", hidden=16)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    shutil.copytree(outside, root / "inside")
    with serving(root, "--metrics-port", "0") as proc:
        yield proc


# ... and names no file system could hold (a 500 once: the name went to stat() unchecked)
BAD_NAMES = ["..", "../outside", "/etc", "a/b", ".hidden", "escape", "nul\x00byte", "x" * 256,
             "\u0130" * 200]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_grpc_load_never_leaves_the_repository(explicit: VolleyProcess, name: str) -> None:
    client = grpcclient.InferenceServerClient(explicit.grpc)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.load_model(name)
        assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT), info.value
        assert "repository" in info.value.message() or "not a path" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.unload_model(name)
        assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT), info.value
    finally:
        client.close()


@pytest.mark.parametrize(
    "name", ["..", ".hidden", "escape", "%2e%2e", "..%2Foutside", "x" * 300, "%C4%B0" * 200]
)
def test_http_load_never_leaves_the_repository(explicit: VolleyProcess, name: str) -> None:
    reply = requests.post(explicit.url + f"/v2/repository/models/{name}/load", timeout=TIMEOUT)
    assert reply.status_code in (400, 404), reply.text
    assert "error" in reply.json()
    # and nothing named like that is being served
    index = requests.post(explicit.url + "/v2/repository/index", timeout=TIMEOUT).json()
    assert {row["name"] for row in index} == {"detect", "detector", "fraud", "inside"}


def test_a_folder_inside_the_repository_still_loads(explicit: VolleyProcess) -> None:
    """The check refuses paths, not models: a real folder loads and serves."""
    reply = requests.post(explicit.url + "/v2/repository/models/inside/load", timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert requests.get(explicit.url + "/v2/models/inside/ready", timeout=TIMEOUT).ok
