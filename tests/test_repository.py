"""The model repository: auto-completed configs, broken configs, versions, load/unload, polling.

Every test builds its own repository under tmp_path and runs its own server on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
import yaml
from conftest import VolleyProcess
from reference import assert_close, ort_outputs
from tritonclient.utils import InferenceServerException

TIMEOUT = 30  # seconds, per HTTP call and per wait: the machine is shared with training jobs
POLL = 0.5  # --poll-repository seconds


# --- helpers --------------------------------------------------------------------------------


def wait_for(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> object:
    """Poll `condition` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def servers(*flags: str) -> Iterator[Callable[..., VolleyProcess]]:
    """Start servers on repositories (each with `flags`); each is stopped, and must exit 0,
    after the test."""
    procs: list[VolleyProcess] = []

    def start(repository: Path, *extra: str) -> VolleyProcess:
        proc = VolleyProcess(repository, "--metrics-port", "0", *flags, *extra)
        procs.append(proc)
        proc.wait_models()
        return proc

    yield start
    codes = [proc.stop() for proc in procs]
    assert codes == [0] * len(procs), codes


@pytest.fixture
def serve() -> Iterator[Callable[..., VolleyProcess]]:
    yield from servers()


def inflight(proc: VolleyProcess) -> float:
    """Inference requests the server is handling now (`volley_inflight_requests`, HTTP)."""
    text = requests.get(proc.url + "/metrics", timeout=TIMEOUT).text
    prefix = 'volley_inflight_requests{protocol="http"} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def index(proc: VolleyProcess) -> list[dict]:
    response = requests.post(proc.url + "/v2/repository/index", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def rows_of(proc: VolleyProcess, model: str) -> list[dict]:
    return [row for row in index(proc) if row["name"] == model]


def model_ready(proc: VolleyProcess, model: str, version: str | None = None) -> int:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
    return requests.get(proc.url + path, timeout=TIMEOUT).status_code


def infer(
    proc: VolleyProcess,
    model: str,
    x: np.ndarray,
    version: str | None = None,
    input_name: str = "input",
    session: requests.Session | None = None,
) -> requests.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [
            {
                "name": input_name,
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }
    return (session or requests).post(proc.url + path, json=body, timeout=TIMEOUT)


def output(response: requests.Response, shape: tuple[int, ...]) -> np.ndarray:
    assert response.status_code == 200, response.text
    (tensor,) = response.json()["outputs"]
    assert tensor["shape"] == list(shape)
    return np.array(tensor["data"], dtype=np.float32).reshape(shape)


def assert_error(response: requests.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def ort_run(model_file: Path, x: np.ndarray, input_name: str = "input") -> np.ndarray:
    """ONNX Runtime's own answer for the model file: the reference for the server's answer."""
    (out,) = ort_outputs(model_file, {input_name: x}).values()
    return out


def small_mlp(path: Path, seed: int, features: int = 32) -> Path:
    return onnx_models.mlp(path, features=features, hidden=32, seed=seed)


def add_version_atomically(model_dir: Path, version: int, seed: int) -> Path:
    """Create `<model_dir>/<version>/model.onnx` so that a poller never sees a partial file.

    The version folder appears first (empty), the file is written under a temporary name and
    renamed into place.
    """
    folder = model_dir / str(version)
    folder.mkdir()
    tmp = small_mlp(folder / "model.onnx.partial", seed=seed)
    os.rename(tmp, folder / "model.onnx")
    return folder / "model.onnx"


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.rename(tmp, path)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))


# --- readiness at start ------------------------------------------------------------------------


@pytest.mark.parametrize("control", [[], ["--model-control", "poll"], ["--no-strict-readiness"]])
def test_not_ready_until_the_models_of_the_start_are_loaded(
    tmp_path: Path, control: list[str]
) -> None:
    """The server listens before it loads its models; /v2/health/ready and gRPC ServerReady
    say ready only once they are loaded, so a client (or a Kubernetes probe) that waits for
    ready never gets a 404 or 503 from the model. A long warmup keeps the model loading for a
    while, and the test checks that the not-ready window was seen. (In explicit mode the
    server said ready in the few ms between listening and starting to load, which a poll
    catches only sometimes; without strict readiness it said so for the whole load.)"""
    root = tmp_path / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    warmup = {"batch_sizes": [1024], "count": 400}
    onnx_models.write_config(root / "mlp", {"max_batch_size": 1024, "warmup": warmup})
    proc = VolleyProcess(root, *control)
    not_ready_seen, ready_seen = 0, False
    try:
        deadline = time.monotonic() + 60
        with requests.Session() as http, grpcclient.InferenceServerClient(proc.grpc) as grpc:

            def model_ready() -> None:
                model = http.get(proc.url + "/v2/models/mlp/ready", timeout=TIMEOUT)
                assert model.status_code == 200, (model.status_code, model.text, proc.log())

            while not ready_seen and time.monotonic() < deadline:
                try:
                    status = http.get(proc.url + "/v2/health/ready", timeout=TIMEOUT).status_code
                except requests.ConnectionError:
                    assert proc.proc.poll() is None, proc.log()
                    time.sleep(0.005)
                    continue
                if status == 200:
                    model_ready()
                    ready_seen = True
                else:
                    not_ready_seen += 1
                try:
                    if grpc.is_server_ready():
                        model_ready()
                except InferenceServerException:  # its port is not open yet
                    pass
        assert ready_seen, f"never ready:\n{proc.log()}"
        assert not_ready_seen > 0, "the server was ready at once: no loading window was tested"
    finally:
        proc.stop()


# --- a model folder without config.yaml -----------------------------------------------------


def test_model_without_config_is_autocompleted(tmp_path: Path, serve) -> None:
    root = tmp_path / "models"
    bare = onnx_models.mlp(root / "bare" / "1" / "model.onnx", features=8, hidden=16)
    onnx_models.fixed_scale(root / "fixed" / "1" / "model.onnx", shape=(2, 3), factor=2.0)
    assert not (root / "bare" / "config.yaml").exists()
    proc = serve(root)

    rows = index(proc)
    assert rows == [
        {"name": "bare", "version": "1", "state": "READY", "reason": ""},
        {"name": "fixed", "version": "1", "state": "READY", "reason": ""},
    ]
    assert requests.get(proc.url + "/v2/health/ready", timeout=TIMEOUT).status_code == 200

    # a dynamic first dimension: batched, shape [-1, F]
    meta = requests.get(proc.url + "/v2/models/bare", timeout=TIMEOUT).json()
    assert meta["name"] == "bare"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}]
    config = requests.get(proc.url + "/v2/models/bare/config", timeout=TIMEOUT).json()
    assert config["max_batch_size"] == 64
    assert "dynamic_batching" in config
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [8]}]
    assert config["output"] == [{"name": "score", "data_type": "TYPE_FP32", "dims": [1]}]
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    assert_close(output(infer(proc, "bare", x), (3, 1)), ort_run(bare, x))
    x64 = np.zeros((64, 8), np.float32)
    assert infer(proc, "bare", x64).status_code == 200
    assert_error(infer(proc, "bare", np.zeros((65, 8), np.float32)), 400, "accepts 1 to 64")

    # every dimension fixed: not batched, the full shape is the tensor's shape
    meta = requests.get(proc.url + "/v2/models/fixed", timeout=TIMEOUT).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 3]}]
    config = requests.get(proc.url + "/v2/models/fixed/config", timeout=TIMEOUT).json()
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(output(infer(proc, "fixed", x, input_name="x"), (2, 3)), x * 2)
    response = infer(proc, "fixed", x.reshape(1, 2, 3), input_name="x")
    assert_error(response, 400, "shape [1, 2, 3]", "expects [2, 3]")


# --- broken configs -------------------------------------------------------------------------

BROKEN = {
    # model name: (config.yaml text, fragments the reason must contain besides the path)
    "bad_input": (
        {"max_batch_size": 8, "inputs": [{"name": "nope", "datatype": "FP32", "dims": [4]}]},
        ["field 'inputs.0.name'", "'nope' is not a graph input", "['input']"],
    ),
    "bad_key": (
        {"max_batch_size": 8, "max_queue": 3},
        ["field 'max_queue'", "Extra inputs are not permitted"],
    ),
    "bad_yaml": ("max_batch_size: [8\ninputs: {\n", ["not valid YAML"]),
    "bad_dims": (
        {"inputs": [{"name": "input", "datatype": "FP32", "dims": [31]}]},
        ["field 'inputs.0.dims'", "[31] does not fit the graph's [32]"],
    ),
    "bad_datatype": (
        {"inputs": [{"name": "input", "datatype": "INT64", "dims": [32]}]},
        ["field 'inputs.0.datatype'", "INT64 but the graph says FP32"],
    ),
    "bad_unknown_datatype": (
        {"inputs": [{"name": "input", "datatype": "FLOAT", "dims": [32]}]},
        ["field 'inputs.0.datatype'", "unknown datatype 'FLOAT'"],
    ),
    "bad_nested": (
        {"dynamic_batching": {"max_queue_delay_us": -5}},
        ["field 'dynamic_batching.max_queue_delay_us'", "greater than or equal to 0"],
    ),
    "bad_top_level": ("- just\n- a list\n", ["expected a mapping at the top level"]),
}


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    root = tmp_path_factory.mktemp("broken") / "models"
    small_mlp(root / "good" / "1" / "model.onnx", seed=1)
    for name, (config, _) in BROKEN.items():
        small_mlp(root / name / "1" / "model.onnx", seed=1)
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        (root / name / "config.yaml").write_text(text)
    (root / "not_onnx" / "1").mkdir(parents=True)
    (root / "not_onnx" / "1" / "model.onnx").write_bytes(b"this is not a protobuf")
    (root / "no_version").mkdir()
    (root / "no_version" / "config.yaml").write_text("max_batch_size: 4\n")
    proc = VolleyProcess(root, "--metrics-port", "0")
    try:
        proc.wait_models()
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_config_marks_model_unavailable(broken_server: VolleyProcess, name: str) -> None:
    proc = broken_server
    _, fragments = BROKEN[name]
    config_path = Path(proc.log_path).parent / "models" / name / "config.yaml"
    (row,) = rows_of(proc, name)
    assert row["state"] == "UNAVAILABLE"
    assert "version" not in row
    reason = row["reason"]
    assert str(config_path) in reason, reason
    for fragment in fragments:
        assert fragment in reason, f"{fragment!r} not in {reason!r}"

    assert model_ready(proc, name) != 200
    response = infer(proc, name, np.zeros((1, 32), np.float32))
    assert_error(response, 503, f"model '{name}' is not ready", str(config_path))
    assert response.headers["retry-after"] == "1"
    # the index's `ready` filter leaves it out
    ready_rows = requests.post(
        proc.url + "/v2/repository/index", json={"ready": True}, timeout=TIMEOUT
    ).json()
    assert name not in {r["name"] for r in ready_rows}


def test_unloadable_files_mark_model_unavailable(broken_server: VolleyProcess) -> None:
    proc = broken_server
    models = Path(proc.log_path).parent / "models"
    (row,) = rows_of(proc, "not_onnx")
    assert row["state"] == "UNAVAILABLE"
    assert str(models / "not_onnx" / "1" / "model.onnx") in row["reason"]
    assert "ONNX Runtime cannot load it" in row["reason"]
    (row,) = rows_of(proc, "no_version")
    assert row["state"] == "UNAVAILABLE"
    assert str(models / "no_version") in row["reason"] and "no version folder" in row["reason"]
    assert model_ready(proc, "not_onnx") != 200
    assert model_ready(proc, "no_version") != 200


def test_broken_models_leave_the_others_serving(broken_server: VolleyProcess) -> None:
    proc = broken_server
    (row,) = rows_of(proc, "good")
    assert row == {"name": "good", "version": "1", "state": "READY", "reason": ""}
    assert model_ready(proc, "good") == 200
    models = Path(proc.log_path).parent / "models"
    x = np.full((2, 32), 0.5, np.float32)
    expected = ort_run(models / "good" / "1" / "model.onnx", x)
    assert_close(output(infer(proc, "good", x), (2, 1)), expected)
    # the server as a whole is not ready while a model on disk failed to load
    response = requests.get(proc.url + "/v2/health/ready", timeout=TIMEOUT)
    assert response.status_code != 200
    assert requests.get(proc.url + "/v2/health/live", timeout=TIMEOUT).status_code == 200


def test_load_after_fixing_the_config(broken_server: VolleyProcess) -> None:
    proc = broken_server
    config_path = Path(proc.log_path).parent / "models" / "bad_key" / "config.yaml"
    # still broken: an explicit load answers 400 with the reason
    response = requests.post(
        proc.url + "/v2/repository/models/bad_key/load", json={}, timeout=TIMEOUT
    )
    assert_error(response, 400, str(config_path), "field 'max_queue'")
    config_path.write_text(yaml.safe_dump({"max_batch_size": 8}))
    response = requests.post(
        proc.url + "/v2/repository/models/bad_key/load", json={}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    assert rows_of(proc, "bad_key") == [
        {"name": "bad_key", "version": "1", "state": "READY", "reason": ""}
    ]
    assert model_ready(proc, "bad_key") == 200
    assert infer(proc, "bad_key", np.zeros((8, 32), np.float32)).status_code == 200
    assert_error(infer(proc, "bad_key", np.zeros((9, 32), np.float32)), 400, "accepts 1 to 8")


# --- versions -------------------------------------------------------------------------------


def test_versions_side_by_side(tmp_path: Path, serve) -> None:
    root = tmp_path / "models"
    files = {v: small_mlp(root / "mlp" / str(v) / "model.onnx", seed=v) for v in (1, 2, 3)}
    onnx_models.write_config(root / "mlp", {"max_batch_size": 8, "dynamic_batching": {}})
    for v in (1, 2, 3):
        small_mlp(root / "newest" / str(v) / "model.onnx", seed=v)
        small_mlp(root / "pinned" / str(v) / "model.onnx", seed=v)
    onnx_models.write_config(root / "newest", {"version_policy": {"latest": 1}})
    onnx_models.write_config(root / "pinned", {"version_policy": {"specific": [1, 3]}})
    proc = serve(root)

    x = np.random.default_rng(11).standard_normal((4, 32)).astype(np.float32)
    expected = {v: ort_run(f, x) for v, f in files.items()}
    assert not close(expected[1], expected[2]) and not close(expected[2], expected[3])

    assert [r["version"] for r in rows_of(proc, "mlp")] == ["1", "2", "3"]
    meta = requests.get(proc.url + "/v2/models/mlp", timeout=TIMEOUT).json()
    assert meta["versions"] == ["1", "2", "3"]

    response = infer(proc, "mlp", x)
    assert response.json()["model_version"] == "3"
    assert_close(output(response, (4, 1)), expected[3])
    for v in (1, 2, 3):
        response = infer(proc, "mlp", x, version=str(v))
        assert response.json()["model_name"] == "mlp"
        assert response.json()["model_version"] == str(v)
        assert_close(output(response, (4, 1)), expected[v])
        assert model_ready(proc, "mlp", str(v)) == 200
    assert_error(
        infer(proc, "mlp", x, version="4"),
        404,
        "Request for unknown model: 'mlp' version 4 is not found",
    )
    assert model_ready(proc, "mlp", "4") != 200

    # version policies: only the selected folders are served
    assert [r["version"] for r in rows_of(proc, "newest")] == ["3"]
    assert infer(proc, "newest", x).json()["model_version"] == "3"
    assert_error(infer(proc, "newest", x, version="1"), 404, "'newest' version 1 is not found")
    assert [r["version"] for r in rows_of(proc, "pinned")] == ["1", "3"]
    assert infer(proc, "pinned", x).json()["model_version"] == "3"
    assert infer(proc, "pinned", x, version="1").json()["model_version"] == "1"
    assert_error(infer(proc, "pinned", x, version="2"), 404, "'pinned' version 2 is not found")

    # statistics are kept per version
    stats = requests.get(proc.url + "/v2/models/mlp/stats", timeout=TIMEOUT).json()
    counts = {s["version"]: s["inference_count"] for s in stats["model_stats"]}
    assert counts == {"1": 4, "2": 4, "3": 8}


# --- load / unload / reload -----------------------------------------------------------------


def two_model_repository(root: Path) -> Path:
    small_mlp(root / "mlp" / "1" / "model.onnx", seed=1)
    onnx_models.write_config(root / "mlp", {"max_batch_size": 8, "dynamic_batching": {}})
    onnx_models.fixed_scale(root / "other" / "1" / "model.onnx")
    return root


def test_load_unload_reload_over_http(tmp_path: Path, serve) -> None:
    root = two_model_repository(tmp_path / "models")
    proc = serve(root)
    url = proc.url + "/v2/repository/models"
    x = np.full((2, 32), 0.3, np.float32)
    other_x = np.ones((2, 3), np.float32)
    before = output(infer(proc, "mlp", x), (2, 1))
    assert_close(before, ort_run(root / "mlp" / "1" / "model.onnx", x))

    response = requests.post(f"{url}/mlp/unload", timeout=TIMEOUT)
    assert response.status_code == 200 and response.json() == {}
    assert model_ready(proc, "mlp") != 200
    response = infer(proc, "mlp", x)
    assert_error(response, 503, "model 'mlp' is not ready", "unloaded")
    assert response.headers["retry-after"] == "1"
    assert rows_of(proc, "mlp") == [{"name": "mlp", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert infer(proc, "other", other_x, input_name="x").status_code == 200
    # unloading twice is harmless
    assert requests.post(f"{url}/mlp/unload", timeout=TIMEOUT).status_code == 200

    response = requests.post(f"{url}/mlp/load", timeout=TIMEOUT)
    assert response.status_code == 200 and response.json() == {}
    assert model_ready(proc, "mlp") == 200
    assert rows_of(proc, "mlp") == [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]
    np.testing.assert_array_equal(output(infer(proc, "mlp", x), (2, 1)), before)

    # reload: new weights in the same version folder are picked up by an explicit load
    new_file = small_mlp(root / "mlp" / "1" / "model.onnx.partial", seed=5)
    os.rename(new_file, root / "mlp" / "1" / "model.onnx")
    assert requests.post(f"{url}/mlp/load", json={}, timeout=TIMEOUT).status_code == 200
    after = output(infer(proc, "mlp", x), (2, 1))
    assert_close(after, ort_run(root / "mlp" / "1" / "model.onnx", x))
    assert not close(after, before)

    # a reload that fails keeps the loaded version serving
    (root / "mlp" / "config.yaml").write_text("max_batch_size: -1\n")
    response = requests.post(f"{url}/mlp/load", timeout=TIMEOUT)
    assert_error(response, 400, str(root / "mlp" / "config.yaml"), "field 'max_batch_size'")
    np.testing.assert_array_equal(output(infer(proc, "mlp", x), (2, 1)), after)
    assert model_ready(proc, "mlp") == 200

    missing = "failed to load 'nope', no model folder 'nope'"
    assert_error(requests.post(f"{url}/nope/load", timeout=TIMEOUT), 404, missing)
    unknown = "Request for unknown model: 'nope' is not found"
    assert_error(requests.post(f"{url}/nope/unload", timeout=TIMEOUT), 404, unknown)
    response = requests.post(
        f"{url}/other/load", json={"parameters": {"file:1/model.onnx": "AAAA"}}, timeout=TIMEOUT
    )
    assert_error(response, 501, "failed to load 'other', file overrides are not supported")
    response = requests.post(f"{url}/other/load", data=b"{not json", timeout=TIMEOUT)
    assert_error(response, 400, "malformed JSON")


def test_load_unload_over_grpc(tmp_path: Path, serve) -> None:
    root = two_model_repository(tmp_path / "models")
    proc = serve(root)
    client = grpcclient.InferenceServerClient(proc.grpc)
    try:
        x = np.full((2, 32), 0.3, np.float32)
        tensor = grpcclient.InferInput("input", [2, 32], "FP32")
        tensor.set_data_from_numpy(x)
        expected = ort_run(root / "mlp" / "1" / "model.onnx", x)
        result = client.infer("mlp", [tensor], client_timeout=TIMEOUT)
        assert_close(result.as_numpy("score"), expected)

        client.unload_model("mlp")
        assert not client.is_model_ready("mlp")
        models = client.get_model_repository_index(as_json=True)["models"]
        assert {"name": "mlp", "state": "UNAVAILABLE", "reason": "unloaded"} in models
        assert {"name": "other", "version": "1", "state": "READY"} in models
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [tensor], client_timeout=TIMEOUT)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "model 'mlp' is not ready: unloaded" in info.value.message()

        client.load_model("mlp")
        assert client.is_model_ready("mlp")
        result = client.infer("mlp", [tensor], client_timeout=TIMEOUT)
        assert_close(result.as_numpy("score"), expected)
        models = client.get_model_repository_index(as_json=True)["models"]
        assert {"name": "mlp", "version": "1", "state": "READY"} in models

        with pytest.raises(InferenceServerException) as info:
            client.load_model("nope")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert "failed to load 'nope', no model folder 'nope'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("nope")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            client.load_model("other", files={"file:1/model.onnx": b"onnx bytes"})
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "file overrides are not supported" in info.value.message()
    finally:
        client.close()


def test_unload_answers_queued_requests_first(tmp_path: Path, serve) -> None:
    root = tmp_path / "models"
    onnx_models.slow(root / "slow" / "1" / "model.onnx")  # ~100 ms a request, one at a time
    onnx_models.write_config(
        root / "slow",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 16}, "intra_op_threads": 1},
    )
    proc = serve(root)
    x = np.full((1, 512), 0.1, np.float32)
    count = 4
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(infer, proc, "slow", x, None, "x") for _ in range(count)]
        wait_for(lambda: inflight(proc) + sum(f.done() for f in futures) >= count, "the queue")
        response = requests.post(proc.url + "/v2/repository/models/slow/unload", timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        # unloading waited for the queue: every request queued before it is answered
        for future in futures:
            assert output(future.result(TIMEOUT), (1, 512)).shape == (1, 512)
    assert_error(infer(proc, "slow", x, input_name="x"), 503, "not ready", "unloaded")


def test_load_with_malformed_parameters(tmp_path: Path, serve) -> None:
    root = two_model_repository(tmp_path / "models")
    proc = serve(root)
    for parameters in ([1], 5, "config"):
        response = requests.post(
            proc.url + "/v2/repository/models/mlp/load",
            json={"parameters": parameters},
            timeout=TIMEOUT,
        )
        assert_error(response, 400, "parameters")


# --- polling --------------------------------------------------------------------------------


class Stream:
    """A background client that keeps sending the same request, naming no version."""

    def __init__(self, proc: VolleyProcess, model: str, x: np.ndarray) -> None:
        self.proc, self.model, self.x = proc, model, x
        self.results: list[tuple[int, str, np.ndarray | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    response = infer(self.proc, self.model, self.x, session=session)
                except requests.RequestException as exc:
                    self.results.append((0, "", repr(exc)))
                    continue
                if response.status_code == 200:
                    doc = response.json()
                    data = np.array(doc["outputs"][0]["data"], np.float32)
                    self.results.append((200, doc["model_version"], data.reshape(-1, 1)))
                else:
                    self.results.append((response.status_code, "", response.text))

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)

    def versions(self) -> list[str]:
        return [version for _, version, _ in self.results]

    def wait_answers(self, version: str, count: int = 10) -> None:
        """Wait until `count` answers in a row came from `version`."""

        def done() -> bool:
            tail = self.versions()[-count:]
            return len(tail) == count and set(tail) == {version}

        wait_for(done, f"{count} answers from version {version}")


def test_poll_switches_versions_without_failing_requests(tmp_path: Path, serve) -> None:
    root = tmp_path / "models"
    model_dir = root / "mlp"
    files = {1: small_mlp(model_dir / "1" / "model.onnx", seed=1)}
    onnx_models.write_config(model_dir, {"max_batch_size": 8, "dynamic_batching": {}})
    proc = serve(root, "--poll-repository", str(POLL))
    x = np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)

    with Stream(proc, "mlp", x) as stream:
        stream.wait_answers("1")
        # the version folder shows up empty first (the poller must keep serving version 1),
        # then the file appears in one rename
        (model_dir / "2").mkdir()
        time.sleep(3 * POLL)
        assert set(stream.versions()) == {"1"}
        tmp = small_mlp(model_dir / "2" / "model.onnx.partial", seed=2)
        os.rename(tmp, model_dir / "2" / "model.onnx")
        files[2] = model_dir / "2" / "model.onnx"
        expected = {v: ort_run(f, x) for v, f in files.items()}
        stream.wait_answers("2")
        # and back: once folder 2 is gone, version 1 answers again
        os.rename(model_dir / "2", model_dir / "retired-2")
        stream.wait_answers("1")

    statuses = [status for status, _, _ in stream.results]
    failures = [r for r in stream.results if r[0] != 200]
    assert not failures, failures[:5]
    assert len(statuses) > 30
    versions = stream.versions()
    # one switch to 2, one switch back: 1...1 2...2 1...1
    switches = [b for a, b in zip(versions, versions[1:], strict=False) if a != b]
    assert switches == ["2", "1"], switches
    for _, version, data in stream.results:
        assert_close(data, expected[int(version)])
    assert rows_of(proc, "mlp") == [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]


def test_poll_adds_and_removes_models(tmp_path: Path, serve) -> None:
    root = tmp_path / "models"
    small_mlp(root / "first" / "1" / "model.onnx", seed=1)
    proc = serve(root, "--poll-repository", str(POLL))
    x = np.zeros((1, 32), np.float32)
    assert infer(proc, "first", x).status_code == 200
    assert model_ready(proc, "second") != 200

    # a new model folder, moved into place whole (dot-folders are not models)
    incoming = root / ".second-incoming"
    second_file = small_mlp(incoming / "1" / "model.onnx", seed=2)
    onnx_models.write_config(incoming, {"max_batch_size": 4, "dynamic_batching": {}})
    assert [r["name"] for r in index(proc)] == ["first"]
    os.rename(incoming, root / "second")
    second_file = root / "second" / "1" / "model.onnx"
    wait_for(lambda: model_ready(proc, "second") == 200, "the new model to be ready")
    response = infer(proc, "second", x)
    assert response.json()["model_version"] == "1"
    assert_close(output(response, (1, 1)), ort_run(second_file, x))
    config = requests.get(proc.url + "/v2/models/second/config", timeout=TIMEOUT).json()
    assert config["max_batch_size"] == 4

    # a config broken on disk: the poller fails to reload it and the loaded version serves on
    write_text_atomically(root / "second" / "config.yaml", "max_batch_size: 4\nbogus: 1\n")
    wait_for(
        lambda: '"event":"load_failed","model":"second"' in proc.log(),
        "the poller to try the broken config",
    )
    assert infer(proc, "second", x).status_code == 200
    assert model_ready(proc, "second") == 200

    # a removed model folder is unloaded and forgotten
    os.rename(root / "first", root / ".first-removed")
    wait_for(lambda: "first" not in {r["name"] for r in index(proc)}, "the model to go away")
    assert_error(infer(proc, "first", x), 404, "Request for unknown model: 'first' is not found")
    assert model_ready(proc, "first") != 200
    assert infer(proc, "second", x).status_code == 200

    # and a folder that comes back is loaded again
    os.rename(root / ".first-removed", root / "first")
    wait_for(lambda: model_ready(proc, "first") == 200, "the model to come back")
    assert infer(proc, "first", x).status_code == 200
