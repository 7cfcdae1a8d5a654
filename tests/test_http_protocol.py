"""The HTTP front end driven by Triton's own client, tritonclient.http, unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from reference import assert_close, ort_outputs
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http)
    yield c
    c.close()


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "volley"
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_and_config(client):
    meta = client.get_model_metadata("mlp")
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}]
    config = client.get_model_config("mlp")
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [32]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["parameters"] == {"purpose": {"string_value": "tests"}}
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_onnxruntime(client, repository, binary):
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("score", binary_data=binary)
    result = client.infer("mlp", [inp], outputs=[out], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == "2"
    want = ort_outputs(repository / "mlp" / "2" / "model.onnx", {"input": x})["score"]
    assert_close(result.as_numpy("score"), want)


def test_named_version_is_served(client, repository):
    x = np.ones((2, 32), dtype=np.float32)
    inp = httpclient.InferInput("input", [2, 32], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp], model_version="1")
    assert result.get_response()["model_version"] == "1"
    want = ort_outputs(repository / "mlp" / "1" / "model.onnx", {"input": x})["score"]
    assert_close(result.as_numpy("score"), want)


@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype(client, repository, binary):
    rng = np.random.default_rng(0)
    feeds = {
        "f16": rng.standard_normal((3, 4)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (3, 4)).astype(np.int64),
        "i32": rng.integers(-1000, 1000, (3, 4)).astype(np.int32),
        "u8": rng.integers(0, 256, (3, 4)).astype(np.uint8),
        "flag": rng.integers(0, 2, (3, 4)).astype(bool),
    }
    types = {"f16": "FP16", "i64": "INT64", "i32": "INT32", "u8": "UINT8", "flag": "BOOL"}
    inputs = []
    for name, value in feeds.items():
        inp = httpclient.InferInput(name, list(value.shape), types[name])
        inp.set_data_from_numpy(value, binary_data=binary)
        inputs.append(inp)
    outputs = [httpclient.InferRequestedOutput(f"{n}_out", binary_data=binary) for n in feeds]
    result = client.infer("dtypes", inputs, outputs=outputs)
    want = ort_outputs(repository / "dtypes" / "1" / "model.onnx", feeds)
    for name, value in want.items():
        got = result.as_numpy(name)
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(client, binary):
    text = np.array([["héllo", "wörld"], ["a", ""]], dtype=np.object_)
    inp = httpclient.InferInput("text", [2, 2], "BYTES")
    inp.set_data_from_numpy(text, binary_data=binary)
    out = httpclient.InferRequestedOutput("text_out", binary_data=binary)
    got = client.infer("strings", [inp], outputs=[out]).as_numpy("text_out")
    decoded = [[x.decode() if isinstance(x, bytes) else x for x in row] for row in got]
    assert decoded == text.tolist()


def test_all_outputs_returned_when_none_requested(client):
    inp = httpclient.InferInput("input", [1, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 32), dtype=np.float32))
    result = client.infer("mlp", [inp])
    assert result.as_numpy("score").shape == (1, 1)


def test_async_infer(client, repository):
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1 + i % 3, 32)).astype(np.float32) for i in range(12)]
    handles = []
    for x in xs:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        handles.append(client.async_infer("mlp", [inp]))
    model = repository / "mlp" / "2" / "model.onnx"
    for x, handle in zip(xs, handles, strict=True):
        got = handle.get_result().as_numpy("score")
        assert_close(got, ort_outputs(model, {"input": x})["score"])


async def test_asyncio_client(server):
    client = aiohttpclient.InferenceServerClient(server.http)
    try:
        inp = aiohttpclient.InferInput("input", [2, 32], "FP32")
        inp.set_data_from_numpy(np.zeros((2, 32), dtype=np.float32))
        result = await client.infer("mlp", [inp])
        assert result.as_numpy("score").shape == (2, 1)
    finally:
        await client.close()


def test_statistics(client):
    inp = httpclient.InferInput("input", [3, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((3, 32), dtype=np.float32))
    before = client.get_inference_statistics("mlp", "2")["model_stats"][0]
    client.infer("mlp", [inp])
    after = client.get_inference_statistics("mlp", "2")["model_stats"][0]
    assert after["name"] == "mlp" and after["version"] == "2"
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 1
    stats = after["inference_stats"]
    assert stats["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[key]["ns"] > 0
    assert any(b["batch_size"] == 3 for b in after["batch_stats"])
    every = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in every} >= {("mlp", "1"), ("mlp", "2"), ("slow", "1")}


def test_repository_index(client):
    index = client.get_model_repository_index()
    rows = {(r["name"], r.get("version")): r["state"] for r in index}
    assert rows[("mlp", "1")] == "READY" and rows[("mlp", "2")] == "READY"
    assert rows[("bare", "1")] == "READY"


def test_errors_reach_the_client(client):
    inp = httpclient.InferInput("input", [1, 31], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 31), dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", [inp])
    assert err.value.status() == "400"
    assert "expects [-1, 32]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404"
