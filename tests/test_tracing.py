"""Triton's trace extension (`server/tracing.py`): tritonclient's `get_trace_settings` and
`update_trace_settings` over HTTP and gRPC against a real server, and the trace file it writes
(Triton's JSON format) read back after it stops: which requests were traced, their timestamps
in order, their tensors, per-model settings, log_frequency files and every worker's traces."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, copy_shipped_models, replace_a_worker, serving
from tritonclient.utils import InferenceServerException

from server.tracing import Tracer, TraceValues, parse_trace_config

HTTP_ORDER = ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START",
              "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END",
              "REQUEST_END", "HTTP_SEND_START", "HTTP_SEND_END"]  # fmt: skip
GRPC_ORDER = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *HTTP_ORDER[2:-2],
              "GRPC_SEND_START", "GRPC_SEND_END"]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracing") / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", features=8, hidden=16)
    onnx_models.write_config(root / "mlp", {"max_batch_size": 8, "dynamic_batching": {}})
    onnx_models.mlp(root / "other" / "1" / "model.onnx", features=8, hidden=16)
    return root


def traces(path: Path) -> dict[int, dict]:
    """A trace file read back: per trace id, its head record, its timestamps in the order
    written and its tensors by (activity, name)."""
    found: dict[int, dict] = {}
    for record in json.loads(path.read_text()):
        trace = found.setdefault(record["id"], {"head": None, "stamps": [], "tensors": {}})
        if "model_name" in record:
            trace["head"] = record
        elif "timestamps" in record:
            trace["stamps"] += [(s["name"], s["ns"]) for s in record["timestamps"]]
        else:
            tensor = record["tensor"]
            trace["tensors"][(record["activity"], tensor["name"])] = tensor
    return found


def row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 8), dtype=np.float32)


def http_infer(client: httpclient.InferenceServerClient, model: str, x: np.ndarray, **kw):
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], **kw).as_numpy("score")


def grpc_infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, **kw):
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], **kw).as_numpy("score")


def test_traced_requests_have_triton_timestamps_in_order_and_their_tensors(
    models: Path, tmp_path: Path
) -> None:
    file = tmp_path / "trace.json"
    with serving(models, "--trace-config", f"triton,file={file}") as server:
        http = httpclient.InferenceServerClient(server.http)
        grpc = grpcclient.InferenceServerClient(server.grpc)
        assert "trace" in http.get_server_metadata()["extensions"]
        assert http.get_trace_settings() == {
            "trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
            "log_frequency": "0", "trace_file": str(file), "trace_mode": "triton",
        }  # fmt: skip
        http_infer(http, "mlp", row(0))  # tracing off: not traced
        on = http.update_trace_settings(
            settings={"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "1"}
        )
        assert on["trace_level"] == ["TIMESTAMPS", "TENSORS"] and on["trace_rate"] == "1"
        answers = {
            "http": http_infer(http, "mlp", row(1), request_id="from-http"),
            "grpc": grpc_infer(grpc, "mlp", row(2), request_id="from-grpc"),
        }
        http.close()
        grpc.close()
    found = traces(file)
    assert len(found) == 2, found
    by_request = {t["head"]["request_id"]: t for t in found.values()}
    for protocol, order, seed in (("http", HTTP_ORDER, 1), ("grpc", GRPC_ORDER, 2)):
        trace = by_request[f"from-{protocol}"]
        assert trace["head"]["model_name"] == "mlp" and trace["head"]["model_version"] == 1
        names = [name for name, _ in trace["stamps"]]
        assert names == order, (protocol, names)
        times = [ns for _, ns in sorted(trace["stamps"], key=lambda s: order.index(s[0]))]
        assert times == sorted(times), (protocol, trace["stamps"])  # each stage after the last
        sent = trace["tensors"][("TENSOR_QUEUE_INPUT", "input")]
        assert sent["shape"] == "1,8" and sent["dtype"] == "FP32"
        values = np.array([float(v) for v in sent["data"].split(",")], dtype=np.float32)
        np.testing.assert_array_equal(values, row(seed).reshape(-1))
        answered = trace["tensors"][("TENSOR_BACKEND_OUTPUT", "score")]
        assert float(answered["data"]) == pytest.approx(float(answers[protocol][0, 0]), rel=1e-6)


def test_rate_count_and_per_model_settings_over_grpc(models: Path, tmp_path: Path) -> None:
    file = tmp_path / "trace.json"
    config = ["--trace-config", f"triton,file={file}", "--trace-config", "level=TIMESTAMPS"]
    with serving(models, *config, "--trace-config", "rate=3") as server:
        grpc = grpcclient.InferenceServerClient(server.grpc)
        own = grpc.update_trace_settings("other", {"trace_rate": "1", "trace_count": "2"},
                                         as_json=True)["settings"]  # fmt: skip
        assert own["trace_rate"]["value"] == ["1"] and own["trace_count"]["value"] == ["2"]
        for seed in range(9):  # one in three traced
            grpc_infer(grpc, "mlp", row(seed))
        for seed in range(5):  # the first two traced, then its count has run out
            grpc_infer(grpc, "other", row(seed))
        assert grpc.get_trace_settings("other", as_json=True)["settings"]["trace_count"] == {
            "value": ["0"]
        }
        # A global change reaches what the model was not given; clearing gives back the rest.
        grpc.update_trace_settings(settings={"trace_level": ["OFF"]})
        other = grpc.get_trace_settings("other", as_json=True)["settings"]
        assert other["trace_level"] == {"value": ["OFF"]} and other["trace_rate"] == {
            "value": ["1"]
        }
        grpc.update_trace_settings("other", {"trace_rate": None, "trace_count": None})
        assert grpc.get_trace_settings("other", as_json=True)["settings"]["trace_rate"] == {
            "value": ["3"]
        }
        grpc.close()
    found = traces(file)
    models_traced = sorted(t["head"]["model_name"] for t in found.values())
    assert models_traced == ["mlp"] * 3 + ["other"] * 2


def test_log_frequency_writes_every_n_traces_to_numbered_files(
    models: Path, tmp_path: Path
) -> None:
    file = tmp_path / "trace.json"
    config = ["--trace-config", f"triton,file={file}", "--trace-config", "triton,log-frequency=2",
              "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1"]  # fmt: skip
    with serving(models, *config) as server:
        http = httpclient.InferenceServerClient(server.http)
        for seed in range(5):
            http_infer(http, "mlp", row(seed))
        deadline = time.monotonic() + 10
        while not (tmp_path / "trace.json.1").exists():  # written as they fill, not at the end
            assert time.monotonic() < deadline, list(tmp_path.iterdir())
            time.sleep(0.05)
        http.close()
    sizes = [len(traces(tmp_path / f"trace.json.{k}")) for k in range(3)]
    assert sizes == [2, 2, 1]  # the last one when the server stopped
    assert not file.exists()


def test_tracing_cannot_be_turned_on_without_a_trace_file(server: VolleyProcess) -> None:
    http = httpclient.InferenceServerClient(server.http)
    assert http.get_trace_settings()["trace_file"] == ""
    with pytest.raises(InferenceServerException, match="needs a trace file") as refused:
        http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert refused.value.status() == "400"
    assert http.get_trace_settings()["trace_level"] == ["OFF"]
    http.close()


def test_a_pipeline_request_traces_the_model_it_runs_as_its_child(tmp_path: Path) -> None:
    file = tmp_path / "trace.json"
    models = copy_shipped_models(tmp_path / "shipped")
    config = ["--trace-config", f"triton,file={file}", "--trace-config", "level=TIMESTAMPS",
              "--trace-config", "rate=1"]  # fmt: skip
    image = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    tensor = grpcclient.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([image, image], dtype=np.object_))
    with serving(models, *config) as server, grpcclient.InferenceServerClient(server.grpc) as c:
        c.infer("detect", [tensor])
    found = traces(file)
    parents = [t for t in found.values() if "parent_id" not in t["head"]]
    children = [t for t in found.values() if "parent_id" in t["head"]]
    assert [p["head"]["model_name"] for p in parents] == ["detect"]
    assert children and all(c["head"]["parent_id"] == parents[0]["head"]["id"] for c in children)
    assert {c["head"]["model_name"] for c in children} == {"detector"}
    for child in children:
        assert [n for n, _ in child["stamps"]] == HTTP_ORDER[2:-2]


def test_stream_requests_are_traced_by_the_data_plane(models: Path, tmp_path: Path) -> None:
    file = tmp_path / "trace.json"
    config = ["--trace-config", f"triton,file={file}", "--trace-config", "level=TIMESTAMPS",
              "--trace-config", "rate=1"]  # fmt: skip
    with serving(models, *config) as server:
        answers: list = []
        client = grpcclient.InferenceServerClient(server.grpc)
        client.start_stream(callback=lambda result, error: answers.append((result, error)))
        tensor = grpcclient.InferInput("input", [1, 8], "FP32")
        tensor.set_data_from_numpy(row(0))
        for i in range(3):
            client.async_stream_infer("mlp", [tensor], request_id=f"s{i}")
        deadline = time.monotonic() + 10
        while len(answers) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        client.stop_stream()
        client.close()
    found = traces(file)
    assert sorted(t["head"]["request_id"] for t in found.values()) == ["s0", "s1", "s2"]
    for trace in found.values():
        assert [n for n, _ in trace["stamps"]] == HTTP_ORDER[2:-2]


@pytest.mark.parametrize(
    ("settings", "status", "said"),
    [
        ({"trace_file": "/etc/cron.d/x"}, "501", "trace_file can only be chosen when the server"),
        ({"trace_rate": "0"}, "400", "trace_rate' must be a whole number from 1"),
        ({"trace_rate": "fast"}, "400", "must be a whole number"),
        ({"trace_count": "-2"}, "400", "trace_count' must be a whole number from -1"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "400", "cannot be given with other levels"),
        ({"trace_level": ["EVERYTHING"]}, "400", "unknown trace level 'EVERYTHING'"),
        ({"trace_mode": "opentelemetry"}, "400", "trace_mode can only be 'triton'"),
        ({"sampling": "1"}, "400", "unknown trace setting 'sampling'"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(
    traced: VolleyProcess, settings: dict, status: str, said: str
) -> None:
    http = httpclient.InferenceServerClient(traced.http)
    before = http.get_trace_settings()
    with pytest.raises(InferenceServerException, match=said) as refused:
        http.update_trace_settings(settings=settings)
    assert refused.value.status() == status
    codes = {"400": "StatusCode.INVALID_ARGUMENT", "501": "StatusCode.UNIMPLEMENTED"}
    with grpcclient.InferenceServerClient(traced.grpc) as grpc:
        with pytest.raises(InferenceServerException, match=said) as refused:
            grpc.update_trace_settings(settings=settings)
        assert refused.value.status() == codes[status]
    assert http.get_trace_settings() == before
    http.close()


def test_settings_of_a_model_not_in_the_repository_are_refused(traced: VolleyProcess) -> None:
    body = {"trace_rate": "1"}
    answer = requests.post(f"{traced.url}/v2/models/nope/trace/setting", json=body, timeout=10)
    assert answer.status_code == 404 and "nope" in answer.json()["error"]
    with (
        grpcclient.InferenceServerClient(traced.grpc) as grpc,
        pytest.raises(InferenceServerException, match="NOT_FOUND"),
    ):
        grpc.get_trace_settings("nope")
    bad = requests.post(f"{traced.url}/v2/trace/setting", json={"trace_rate": 5}, timeout=10)
    assert bad.status_code == 400 and "takes strings" in bad.json()["error"]


@pytest.fixture(scope="module")
def traced(models: Path, tmp_path_factory: pytest.TempPathFactory):
    file = tmp_path_factory.mktemp("traced") / "trace.json"
    with serving(models, "--trace-config", f"triton,file={file}") as server:
        yield server


def test_every_worker_traces_with_the_settings_and_one_that_restarts_too(
    models: Path, tmp_path: Path
) -> None:
    file = tmp_path / "trace.json"
    with serving(models, "--workers", "2", "--trace-config", f"triton,file={file}") as server:
        http = httpclient.InferenceServerClient(server.http)
        http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        replace_a_worker(server)
        clients = [httpclient.InferenceServerClient(server.http) for _ in range(4)]
        for client in clients:  # open together: the supervisor spreads them over both workers
            assert client.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]
        for seed in range(40):
            http_infer(clients[seed % 4], "mlp", row(seed))
        for client in [http, *clients]:
            client.close()
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("trace.json"))
    assert files == ["trace.json.worker0", "trace.json.worker1"], files
    ids = [i for name in files for i in traces(tmp_path / name)]
    assert len(ids) >= 40 - 1 and len(ids) == len(set(ids))  # unique over the workers


def test_trace_config_is_checked_at_start() -> None:
    values, file = parse_trace_config(
        ["triton,file=/tmp/t.json", "level=TIMESTAMPS", "level=TENSORS", "rate=10", "count=5",
         "triton,log-frequency=3", "mode=triton"]
    )  # fmt: skip
    assert file == "/tmp/t.json"
    assert values == TraceValues(("TIMESTAMPS", "TENSORS"), 10, 5, 3)
    for bad, said in (
        (["level=TIMESTAMPS"], "needs a file"),
        (["file=/tmp/t.json"], "unknown setting"),
        (["triton,rate=2"], "unknown setting"),
        (["rate"], "expected"),
        (["count=-7"], "from -1"),
    ):
        with pytest.raises(ValueError, match=said):
            parse_trace_config(bad)


def test_a_global_change_reaches_models_where_they_were_not_given_a_value() -> None:
    tracer = Tracer()
    tracer.configure(TraceValues(), "/tmp/unused.json")
    tracer.apply("a", {"trace_rate": "2"})
    tracer.apply("", {"trace_level": ["TIMESTAMPS"], "trace_count": "4"})
    assert tracer.on
    assert tracer.settings("a")["trace_level"] == ["TIMESTAMPS"]
    assert tracer.settings("a")["trace_rate"] == "2" and tracer.settings("a")["trace_count"] == "4"
    sampled = [tracer.sample("a") is not None for _ in range(6)]
    assert sampled == [False, True, False, True, False, True]
    assert tracer.settings("a")["trace_count"] == "1" and tracer.settings()["trace_count"] == "4"
    tracer.apply("a", {})  # no settings: the model's own are dropped
    assert tracer.settings("a") == tracer.settings()
    tracer.apply("", {"trace_level": None})  # back to the start: OFF
    assert not tracer.on


def test_a_trace_file_that_takes_no_writes_fails_no_request(models: Path) -> None:
    # /dev/full opens, and fails every write with ENOSPC: a disk that has filled up.
    config = ["--trace-config", "triton,file=/dev/full", "--trace-config", "level=TIMESTAMPS",
              "--trace-config", "rate=1"]  # fmt: skip
    with serving(models, *config) as server:
        with httpclient.InferenceServerClient(server.http) as http:
            for seed in range(200):  # far more than one write buffer of traces
                assert http_infer(http, "mlp", row(seed)).shape == (1, 1)
        failures = [line for line in server.log().splitlines() if "trace_write_failed" in line]
    assert len(failures) == 1, failures  # said once, not once a request
