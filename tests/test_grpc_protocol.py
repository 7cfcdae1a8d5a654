"""The gRPC front end driven by Triton's own client, tritonclient.grpc, unchanged."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from reference import assert_close, ort_outputs
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    c.close()


def _input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert not client.is_model_ready("nope")
    assert "statistics" in client.get_server_metadata().extensions
    meta = client.get_model_metadata("mlp", as_json=True)
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "32"]}]
    config = client.get_model_config("mlp", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"


def test_infer_matches_onnxruntime(client, repository):
    x = np.random.default_rng(5).standard_normal((4, 32)).astype(np.float32)
    result = client.infer("mlp", [_input(x)], request_id="g-1")
    assert result.get_response().id == "g-1"
    assert result.get_response().model_version == "2"
    want = ort_outputs(repository / "mlp" / "2" / "model.onnx", {"input": x})["score"]
    assert_close(result.as_numpy("score"), want)
    result = client.infer("mlp", [_input(x)], model_version="1")
    want = ort_outputs(repository / "mlp" / "1" / "model.onnx", {"input": x})["score"]
    assert_close(result.as_numpy("score"), want)


def test_answers_of_changing_shapes_ids_and_versions(client, repository):
    """A unary answer is assembled from a head serialized once per model, version and output
    shapes, and its own id and contents: each answer still carries its own."""
    rng = np.random.default_rng(9)
    for i, (rows, version) in enumerate([(1, "2"), (3, "2"), (1, "1"), (3, "1"), (1, "2")]):
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        request_id = f"shape-{i}" if i % 2 else ""
        result = client.infer("mlp", [_input(x)], model_version=version, request_id=request_id)
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == (
            "mlp", version, request_id
        )  # fmt: skip
        want = ort_outputs(repository / "mlp" / version / "model.onnx", {"input": x})["score"]
        assert result.as_numpy("score").shape == want.shape == (rows, 1)
        assert_close(result.as_numpy("score"), want)


def test_every_datatype(client, repository):
    rng = np.random.default_rng(1)
    feeds = {
        "f16": ("FP16", rng.standard_normal((2, 4)).astype(np.float16)),
        "i64": ("INT64", rng.integers(-(2**40), 2**40, (2, 4)).astype(np.int64)),
        "i32": ("INT32", rng.integers(-9, 9, (2, 4)).astype(np.int32)),
        "u8": ("UINT8", rng.integers(0, 256, (2, 4)).astype(np.uint8)),
        "flag": ("BOOL", rng.integers(0, 2, (2, 4)).astype(bool)),
    }
    result = client.infer("dtypes", [_input(v, n, t) for n, (t, v) in feeds.items()])
    want = ort_outputs(
        repository / "dtypes" / "1" / "model.onnx", {n: v for n, (_, v) in feeds.items()}
    )
    for name, value in want.items():
        np.testing.assert_array_equal(result.as_numpy(name), value)


def test_bytes_tensors(client):
    text = np.array([[b"caf\xc3\xa9", b"x"]], dtype=np.object_)
    got = client.infer("strings", [_input(text, "text", "BYTES")]).as_numpy("text_out")
    assert got.tolist() == text.tolist()
    bad = np.array([[b"\xff", b"x"]], dtype=np.object_)
    with pytest.raises(InferenceServerException) as err:
        client.infer("strings", [_input(bad, "text", "BYTES")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "not UTF-8" in err.value.message()


def test_async_infer(client, repository):
    xs = [np.full((1, 32), i, dtype=np.float32) for i in range(10)]
    results: queue.Queue = queue.Queue()
    for i, x in enumerate(xs):
        client.async_infer(
            "mlp", [_input(x)], callback=lambda result, error, i=i: results.put((i, result, error))
        )
    model = repository / "mlp" / "2" / "model.onnx"
    for _ in xs:
        i, result, error = results.get(timeout=30)
        assert error is None
        want = ort_outputs(model, {"input": xs[i]})["score"]
        assert_close(result.as_numpy("score"), want)


def test_bidirectional_stream(client, repository):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = {str(i): np.full((1 + i % 2, 32), i / 10, dtype=np.float32) for i in range(8)}
        for rid, x in xs.items():
            client.async_stream_infer("mlp", [_input(x)], request_id=rid)
        bad = np.zeros((1, 3), dtype=np.float32)
        client.async_stream_infer("mlp", [_input(bad)], request_id="bad")
        client.async_stream_infer("mlp", [_input(xs["0"])], request_id="after-bad")
        got = {}
        errors = []
        for _ in range(len(xs) + 2):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("score")
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "expects [-1, 32]" in str(errors[0])
    model = repository / "mlp" / "2" / "model.onnx"
    assert set(got) == set(xs) | {"after-bad"}
    for rid, x in xs.items():
        assert_close(got[rid], ort_outputs(model, {"input": x})["score"])


async def test_asyncio_client_stream(server):
    client = aiogrpcclient.InferenceServerClient(server.grpc)
    try:

        async def requests():
            for i in range(4):
                yield {"model_name": "mlp", "inputs": [_input(np.ones((1, 32), np.float32))],
                       "request_id": f"a{i}"}  # fmt: skip

        ids = []
        async for result, error in client.stream_infer(requests()):
            assert error is None
            ids.append(result.get_response().id)
            if len(ids) == 4:
                break
        assert sorted(ids) == ["a0", "a1", "a2", "a3"]
    finally:
        await client.close()


def test_statistics_and_index(client):
    client.infer("mlp", [_input(np.zeros((2, 32), np.float32))], model_version="1")
    stats = client.get_inference_statistics("mlp", "1", as_json=True)["model_stats"][0]
    assert stats["name"] == "mlp" and stats["version"] == "1"
    assert int(stats["inference_count"]) >= 2
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "mlp", "version": "2", "state": "READY"} in [
        {k: r.get(k) for k in ("name", "version", "state")} for r in index
    ]


def test_status_codes(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [_input(np.zeros((1, 32), np.float32))])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", [_input(np.zeros((1, 32), np.int64), datatype="INT64")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expects FP32" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config("mlp", "9")
    assert err.value.status() == "StatusCode.NOT_FOUND"
