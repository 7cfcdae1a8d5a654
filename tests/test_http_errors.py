"""Error answers of the infer route: every bad request gets the right status and a JSON message.

Plain `requests` against the shared server (and a few mirrors over gRPC with tritonclient), plus
one server of our own with a small `--max-request-bytes` for the 413 cases.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess, serving
from reference import assert_close, ort_outputs
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

TIMEOUT = 30  # seconds, per HTTP call: the machine is shared with training jobs
SLOW_WIDTH = 512


def infer_url(server: VolleyProcess, model: str, version: str | None = None) -> str:
    if version is None:
        return f"{server.url}/v2/models/{model}/infer"
    return f"{server.url}/v2/models/{model}/versions/{version}/infer"


def mlp_input(rows: int = 1, features: int = 32, **overrides) -> dict:
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": [rows, features],
        "data": [0.25] * (rows * features),
    }
    tensor.update(overrides)
    return tensor


def post(url: str, body: object = None, **kwargs) -> requests.Response:
    if isinstance(body, dict | list):
        body = json.dumps(body)
    return requests.post(url, data=body, timeout=TIMEOUT, **kwargs)


def assert_error(response: requests.Response, status: int, *fragments: str) -> str:
    """The response has `status`, a JSON `{"error": ...}` body, and each fragment in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def slow_body(value: float = 0.1, **parameters) -> dict:
    body: dict = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, SLOW_WIDTH],
                "data": [value] * SLOW_WIDTH,
            }
        ]
    }
    if parameters:
        body["parameters"] = parameters
    return body


def inflight(server: VolleyProcess, protocol: str = "http") -> float:
    """The server's `volley_inflight_requests` gauge for one protocol."""
    text = requests.get(server.url + "/metrics", timeout=TIMEOUT).text
    prefix = f'volley_inflight_requests{{protocol="{protocol}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


class SlowBusy:
    """Keep the shared `slow` model (1 instance, max_queue_size 2) busy: one request running
    and one queued, so a request sent now waits in the queue for at least one batch (~100 ms)."""

    def __init__(self, server: VolleyProcess, requests_in_flight: int = 2) -> None:
        self.server = server
        self.count = requests_in_flight
        self.pool = ThreadPoolExecutor(self.count)
        self.futures = []

    def __enter__(self) -> SlowBusy:
        base = inflight(self.server)
        url = infer_url(self.server, "slow")
        for _ in range(self.count):
            self.futures.append(self.pool.submit(post, url, slow_body()))
            time.sleep(0.005)
        deadline = time.monotonic() + TIMEOUT
        while inflight(self.server) < base + self.count:
            assert time.monotonic() < deadline, "background slow requests never arrived"
            time.sleep(0.005)
        return self

    def __exit__(self, *exc) -> None:
        statuses = [f.result().status_code for f in self.futures]
        self.pool.shutdown()
        assert statuses == [200] * self.count, statuses


# --- JSON body ------------------------------------------------------------------------------


def test_malformed_json(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), b'{"inputs": [')
    assert_error(response, 400, "malformed JSON")


def test_body_not_an_object(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), [mlp_input()])
    assert_error(response, 400, "request body must be a JSON object")


@pytest.mark.parametrize("body", [{}, {"inputs": []}, {"inputs": "input"}])
def test_missing_inputs(server: VolleyProcess, body: dict) -> None:
    response = post(infer_url(server, "mlp"), body)
    assert_error(response, 400, "non-empty 'inputs' list")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [1]}, "each input must be a JSON object"),
        ({"inputs": [mlp_input(name=3)]}, "input name must be a string"),
        ({"inputs": [mlp_input(shape="1x32")]}, "must be a list of non-negative integers"),
        ({"inputs": [mlp_input(shape=[True, 32])]}, "must be a list of non-negative integers"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32]}]}, "neither 'data'"),
        ({"inputs": [mlp_input()], "outputs": "score"}, "'outputs' must be a list"),
        ({"inputs": [mlp_input()], "id": 5}, "id must be a string"),
        ({"inputs": [mlp_input()], "parameters": []}, "parameters must be a JSON object"),
    ],
    ids=["input", "name", "shape-str", "shape-bool", "no-data", "outputs", "id", "parameters"],
)
def test_malformed_fields(server: VolleyProcess, body: dict, message: str) -> None:
    response = post(infer_url(server, "mlp"), body)
    assert_error(response, 400, message)


def test_missing_one_of_several_inputs(server: VolleyProcess) -> None:
    body = {"inputs": [{"name": "f16", "datatype": "FP16", "shape": [1, 4], "data": [1] * 4}]}
    response = post(infer_url(server, "dtypes"), body)
    assert_error(response, 400, "missing input", "'dtypes'")


def test_unexpected_input_name(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(name="features")]})
    assert_error(response, 400, "unexpected input 'features'", "['input']")


@pytest.mark.parametrize("shape", [[1, 31], [32], [1, 32, 1]])
def test_wrong_shape(server: VolleyProcess, shape: list[int]) -> None:
    count = int(np.prod(shape))
    tensor = mlp_input(shape=shape, data=[0.0] * count)
    response = post(infer_url(server, "mlp"), {"inputs": [tensor]})
    assert_error(response, 400, f"shape {shape}", "'mlp' expects [-1, 32]")


def test_negative_shape(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(shape=[-1, 32])]})
    assert_error(response, 400, "shape of input 'input' must be a list of non-negative integers")


def test_wrong_datatype(server: VolleyProcess) -> None:
    tensor = mlp_input(datatype="INT64", data=[1] * 32)
    response = post(infer_url(server, "mlp"), {"inputs": [tensor]})
    assert_error(response, 400, "datatype INT64", "expects FP32")


def test_unknown_datatype(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(datatype="FLOAT")]})
    assert_error(response, 400, "unsupported datatype 'FLOAT'")


@pytest.mark.parametrize("count", [31, 33, 64])
def test_data_count_not_matching_shape(server: VolleyProcess, count: int) -> None:
    tensor = mlp_input(data=[0.5] * count)
    response = post(infer_url(server, "mlp"), {"inputs": [tensor]})
    assert_error(response, 400, "does not match its shape", f"{count} elements for shape [1, 32]")


@pytest.mark.parametrize(
    "data", [["a"] * 32, [None] * 32, [{"x": 1}] * 32], ids=["str", "null", "obj"]
)
def test_non_numeric_data(server: VolleyProcess, data: list) -> None:
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(data=data)]})
    assert_error(response, 400, "data of input 'input' does not match its shape or datatype")


def test_non_integer_data_for_int_input(server: VolleyProcess) -> None:
    body = {
        "inputs": [
            {"name": "f16", "datatype": "FP16", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "i64", "datatype": "INT64", "shape": [1, 4], "data": [1.5, 2, 3, 4]},
            {"name": "i32", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "u8", "datatype": "UINT8", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "flag", "datatype": "BOOL", "shape": [1, 4], "data": [True] * 4},
        ]
    }
    response = post(infer_url(server, "dtypes"), body)
    assert_error(response, 400, "input 'i64'", "non-integer values for datatype INT64")
    body["inputs"][1]["data"] = [1, 2, 3, 4]
    body["inputs"][3]["data"] = [1, 2, 3, 256]
    response = post(infer_url(server, "dtypes"), body)
    assert_error(response, 400, "input 'u8'", "out of range for datatype UINT8")


def test_unknown_model(server: VolleyProcess) -> None:
    response = post(infer_url(server, "nope"), {"inputs": [mlp_input()]})
    assert_error(response, 404, "Request for unknown model: 'nope' is not found")


def test_unknown_version(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp", "7"), {"inputs": [mlp_input()]})
    assert_error(response, 404, "Request for unknown model: 'mlp' version 7 is not found")


def test_unknown_output(server: VolleyProcess) -> None:
    body = {"inputs": [mlp_input()], "outputs": [{"name": "logits"}]}
    response = post(infer_url(server, "mlp"), body)
    assert_error(response, 400, "unknown output 'logits'", "['score']")


def test_batch_larger_than_max_batch_size(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(rows=65)]})
    assert_error(response, 400, "batch size 65", "accepts 1 to 64")


def test_zero_batch(server: VolleyProcess) -> None:
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(rows=0)]})
    assert_error(response, 400, "batch size 0", "accepts 1 to 64")


DTYPES_INPUTS = {"f16": "FP16", "i64": "INT64", "i32": "INT32", "u8": "UINT8", "flag": "BOOL"}


def dtypes_tensors(rows: dict[str, int]) -> list[tuple[str, str, np.ndarray]]:
    """The shared `dtypes` model's inputs as (name, datatype, ones [n, 4]), n = 2 unless `rows`
    says otherwise."""
    return [
        (name, datatype, np.ones((rows.get(name, 2), 4), triton_to_np_dtype(datatype)))
        for name, datatype in DTYPES_INPUTS.items()
    ]


def test_duplicate_input_name(server: VolleyProcess) -> None:
    body = {"inputs": [mlp_input(), mlp_input(data=[0.5] * 32)]}
    response = post(infer_url(server, "mlp"), body)
    assert_error(response, 400, "input 'input' is given twice")


def test_inputs_disagree_on_the_batch_size(server: VolleyProcess) -> None:
    inputs = [
        {"name": name, "datatype": datatype, "shape": list(a.shape), "data": a.ravel().tolist()}
        for name, datatype, a in dtypes_tensors({"i64": 3})
    ]
    response = post(infer_url(server, "dtypes"), {"inputs": inputs})
    assert_error(response, 400, "inputs of model 'dtypes' disagree on the batch size")


@pytest.mark.parametrize(
    "parameters", [{"timeout": -1}, {"timeout": "soon"}, {"timeout": 1.5}, {"timeout": True}]
)
def test_bad_timeout_parameter(server: VolleyProcess, parameters: dict) -> None:
    body = {"inputs": [mlp_input()], "parameters": parameters}
    response = post(infer_url(server, "mlp"), body)
    assert_error(response, 400, "parameter 'timeout' must be a non-negative integer")


def test_valid_request_still_works(server: VolleyProcess, repository: Path) -> None:
    """The baseline the error cases differ from: the same body, well formed, answers 200."""
    response = post(infer_url(server, "mlp"), {"inputs": [mlp_input(rows=2)]})
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["model_name"] == "mlp"
    assert doc["model_version"] == "2"
    x = np.full((2, 32), 0.25, dtype=np.float32)
    expected = ort_outputs(repository / "mlp" / "2" / "model.onnx", {"input": x})["score"]
    (output,) = doc["outputs"]
    assert output["shape"] == [2, 1]
    assert_close(np.array(output["data"]), expected.ravel())


# --- routes and methods ---------------------------------------------------------------------


def test_unknown_route(server: VolleyProcess) -> None:
    response = requests.get(server.url + "/v2/nothing/here", timeout=TIMEOUT)
    assert_error(response, 404, "Not Found")
    response = post(server.url + "/v2/models/mlp/predict", {"inputs": [mlp_input()]})
    assert_error(response, 404, "Not Found")


def test_wrong_method_on_control_route(server: VolleyProcess) -> None:
    response = post(server.url + "/v2/health/live", {})
    assert_error(response, 405, "Method Not Allowed")


def test_wrong_method_on_control_route_says_allow(server: VolleyProcess) -> None:
    response = post(server.url + "/v2/health/live", {})
    assert response.status_code == 405
    assert response.headers.get("allow") == "GET"


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_wrong_method_on_infer(server: VolleyProcess, method: str) -> None:
    response = requests.request(method, infer_url(server, "mlp"), timeout=TIMEOUT)
    assert_error(response, 405, "Method Not Allowed")
    assert response.headers.get("allow") == "POST"


# --- binary tensor data extension -----------------------------------------------------------


def binary_request(
    array: np.ndarray, claimed: int | None = None, extra: bytes = b"", **doc_extra
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body for mlp: JSON header, then the raw FP32 bytes of `array`."""
    raw = array.astype("<f4").tobytes()
    doc = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(raw) if claimed is None else claimed},
            }
        ],
        **doc_extra,
    }
    header = json.dumps(doc).encode()
    return header + raw + extra, {"Inference-Header-Content-Length": str(len(header))}


def test_binary_header_length_beyond_body(server: VolleyProcess) -> None:
    body, headers = binary_request(np.zeros((1, 32), np.float32))
    headers["Inference-Header-Content-Length"] = str(len(body) + 1)
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert_error(response, 400, f"Inference-Header-Content-Length {len(body) + 1}", "outside")


def test_binary_header_length_not_an_integer(server: VolleyProcess) -> None:
    body, headers = binary_request(np.zeros((1, 32), np.float32))
    headers["Inference-Header-Content-Length"] = "twelve"
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert_error(response, 400, "'twelve' is not an integer")


def test_binary_header_length_cuts_the_json(server: VolleyProcess) -> None:
    body, headers = binary_request(np.zeros((1, 32), np.float32))
    headers["Inference-Header-Content-Length"] = "10"
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert_error(response, 400, "malformed JSON")


def test_binary_data_size_larger_than_remaining(server: VolleyProcess) -> None:
    body, headers = binary_request(np.zeros((1, 32), np.float32), claimed=256)
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert_error(response, 400, "claims 256 bytes of binary data, only 128 remain")


def test_binary_data_size_not_matching_shape(server: VolleyProcess) -> None:
    body, headers = binary_request(np.zeros((1, 32), np.float32), claimed=64)
    # the other 64 bytes stay unclaimed, but the size check of the tensor itself comes first
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert_error(response, 400, "expected 128 bytes", "got 64")


def test_binary_bytes_left_over(server: VolleyProcess) -> None:
    body, headers = binary_request(np.zeros((1, 32), np.float32), extra=b"\0" * 12)
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert_error(response, 400, "12 bytes of binary data are not claimed")


def test_binary_and_json_data_together(server: VolleyProcess) -> None:
    array = np.zeros((1, 32), np.float32)
    raw = array.tobytes()
    doc = {"inputs": [mlp_input(parameters={"binary_data_size": len(raw)})]}
    header = json.dumps(doc).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    response = post(infer_url(server, "mlp"), header + raw, headers=headers)
    assert_error(response, 400, "both 'data' and binary_data_size")


def test_binary_request_matches_onnxruntime(server: VolleyProcess, repository: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    expected = ort_outputs(repository / "mlp" / "2" / "model.onnx", {"input": x})["score"]

    # binary input, JSON output
    body, headers = binary_request(x)
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["model_version"] == "2"
    (output,) = doc["outputs"]
    assert output["name"] == "score" and output["shape"] == [5, 1]
    assert_close(np.array(output["data"]), expected.ravel())

    # binary input, binary output
    body, headers = binary_request(x, parameters={"binary_data_output": True})
    response = post(infer_url(server, "mlp"), body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header_length = int(response.headers["inference-header-content-length"])
    doc = json.loads(response.content[:header_length])
    (output,) = doc["outputs"]
    assert output["parameters"]["binary_data_size"] == 5 * 4
    assert len(response.content) == header_length + 5 * 4
    values = np.frombuffer(response.content[header_length:], "<f4").reshape(5, 1)
    assert_close(values, expected)


# --- content encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request(server: VolleyProcess, repository: Path, encoding: str) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    body = json.dumps({"inputs": [mlp_input(rows=2, data=x.ravel().tolist())]}).encode()
    plain = post(infer_url(server, "mlp"), body)
    compressed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    zipped = post(infer_url(server, "mlp"), compressed, headers={"Content-Encoding": encoding})
    assert plain.status_code == zipped.status_code == 200, zipped.text
    assert zipped.json() == plain.json()
    expected = ort_outputs(repository / "mlp" / "2" / "model.onnx", {"input": x})["score"]
    data = np.array(zipped.json()["outputs"][0]["data"])
    assert_close(data, expected.ravel())


def test_gzip_binary_request(server: VolleyProcess) -> None:
    body, headers = binary_request(np.ones((3, 32), np.float32))
    headers["Content-Encoding"] = "gzip"
    response = post(infer_url(server, "mlp"), gzip.compress(body), headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [3, 1]


def test_invalid_gzip_body(server: VolleyProcess) -> None:
    response = post(
        infer_url(server, "mlp"), b"certainly not gzip", headers={"Content-Encoding": "gzip"}
    )
    assert_error(response, 400, "not valid gzip data")


def test_unsupported_content_encoding(server: VolleyProcess) -> None:
    body = json.dumps({"inputs": [mlp_input()]})
    response = post(infer_url(server, "mlp"), body, headers={"Content-Encoding": "br"})
    assert_error(response, 400, "unsupported Content-Encoding 'br'")


# --- request size limit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(repository: Path) -> Iterator[VolleyProcess]:
    """A server of our own that takes request bodies of at most 100 000 bytes."""
    with serving(repository, "--max-request-bytes", "100000", "--metrics-port", "0") as proc:
        yield proc


def big_body() -> bytes:
    """A well-formed rowsum request ([8, 2000] FP32) whose JSON is far over 100 000 bytes."""
    data = [0.123456789] * (8 * 2000)
    tensor = {"name": "x", "datatype": "FP32", "shape": [8, 2000], "data": data}
    body = json.dumps({"inputs": [tensor]}).encode()
    assert len(body) > 100_000
    return body


def test_oversized_body(small_server: VolleyProcess) -> None:
    body = big_body()
    response = post(infer_url(small_server, "rowsum"), body)
    assert_error(response, 413, f"request body of {len(body)} bytes exceeds 100000 bytes")


def test_oversized_chunked_body(small_server: VolleyProcess) -> None:
    """Without Content-Length the limit is enforced while the body streams in."""
    body = big_body()
    chunks = iter([body[i : i + 8192] for i in range(0, len(body), 8192)])
    response = post(infer_url(small_server, "rowsum"), chunks)
    assert_error(response, 413, "request body exceeds 100000 bytes")


def test_oversized_chunked_body_headed_for_the_decoder_process(small_server: VolleyProcess) -> None:
    """A chunked body whose declared JSON part is large enough for the decoder process is held
    to the same limit, whether it streams there or arrives whole with its headers (one write:
    the server has all of it before the request is handled)."""
    body = big_body()[:110_000]  # over the limit; its JSON part is cut, but it is never read
    head = (
        f"POST /v2/models/rowsum/infer HTTP/1.1\r\nHost: test\r\n"
        f"Inference-Header-Content-Length: {2 * len(body)}\r\n"  # past OFFLOAD_BYTES
        f"Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    for chunks in ([body[:50_000], body[50_000:]], [body]):
        request = head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        host, port = small_server.http.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as connection:
            connection.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                data = connection.recv(65536)
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"request body exceeds 100000 bytes" in answer, answer[-200:]


def test_oversized_after_decompression(small_server: VolleyProcess) -> None:
    body = big_body()
    compressed = gzip.compress(body)
    assert len(compressed) < 100_000
    response = post(
        infer_url(small_server, "rowsum"), compressed, headers={"Content-Encoding": "gzip"}
    )
    assert_error(response, 413, "decompressed body exceeds 100000 bytes")


def test_body_under_the_limit_is_served(small_server: VolleyProcess) -> None:
    response = post(infer_url(small_server, "mlp"), {"inputs": [mlp_input(rows=4)]})
    assert response.status_code == 200, response.text


# --- overload and timeouts on the slow model ------------------------------------------------


def test_queue_full(server: VolleyProcess) -> None:
    """slow: max_batch_size 1, 1 instance, max_queue_size 2: a burst of 12 overflows it."""
    count = 12
    barrier = threading.Barrier(count)
    url = infer_url(server, "slow")

    def one(i: int) -> requests.Response:
        body = json.dumps(slow_body(value=i / count))
        barrier.wait(TIMEOUT)
        return post(url, body)

    with ThreadPoolExecutor(count) as pool:
        responses = list(pool.map(one, range(count)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses  # none lost, none failed otherwise
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "model 'slow' queue is full", "2 requests queued")
            assert response.headers["retry-after"] == "1"
        else:
            doc = response.json()
            assert doc["outputs"][0]["shape"] == [1, SLOW_WIDTH]


def test_request_timeout(server: VolleyProcess) -> None:
    with SlowBusy(server):
        response = post(infer_url(server, "slow"), slow_body(timeout=1000))
    assert_error(response, 504, "timed out", "model 'slow'")


def test_default_queue_timeout_zero_means_wait(server: VolleyProcess) -> None:
    """Without a timeout a queued request waits for its turn and succeeds."""
    with SlowBusy(server, requests_in_flight=1):
        response = post(infer_url(server, "slow"), slow_body())
    assert response.status_code == 200, response.text


# --- the same errors over gRPC --------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_client(server: VolleyProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        yield client
    finally:
        client.close()


def grpc_input(array: np.ndarray, name: str = "input") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_grpc_unknown_model(grpc_client: grpcclient.InferenceServerClient) -> None:
    x = np.zeros((1, 32), np.float32)
    error = grpc_error(lambda: grpc_client.infer("nope", [grpc_input(x)], client_timeout=TIMEOUT))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nope' is not found" in error.message()


def test_grpc_unknown_version(grpc_client: grpcclient.InferenceServerClient) -> None:
    x = np.zeros((1, 32), np.float32)
    error = grpc_error(
        lambda: grpc_client.infer("mlp", [grpc_input(x)], model_version="7", client_timeout=TIMEOUT)
    )
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'mlp' version 7 is not found" in error.message()


def test_grpc_wrong_shape(grpc_client: grpcclient.InferenceServerClient) -> None:
    x = np.zeros((1, 31), np.float32)
    error = grpc_error(lambda: grpc_client.infer("mlp", [grpc_input(x)], client_timeout=TIMEOUT))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape [1, 31]" in error.message() and "expects [-1, 32]" in error.message()


def test_grpc_duplicate_input_name(grpc_client: grpcclient.InferenceServerClient) -> None:
    x = np.zeros((1, 32), np.float32)
    error = grpc_error(
        lambda: grpc_client.infer("mlp", [grpc_input(x), grpc_input(x)], client_timeout=TIMEOUT)
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == "input 'input' is given twice"


def test_grpc_inputs_disagree_on_the_batch_size(
    grpc_client: grpcclient.InferenceServerClient,
) -> None:
    inputs = []
    for name, datatype, array in dtypes_tensors({"flag": 1}):
        inputs.append(grpcclient.InferInput(name, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array)
    error = grpc_error(lambda: grpc_client.infer("dtypes", inputs, client_timeout=TIMEOUT))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == "inputs of model 'dtypes' disagree on the batch size"


def test_grpc_message_over_the_limit(small_server: VolleyProcess) -> None:
    """A gRPC request over --max-request-bytes fails alone with RESOURCE_EXHAUSTED; the server
    goes on serving, the same connection included."""
    client = grpcclient.InferenceServerClient(small_server.grpc)
    try:
        big = np.full((16, 2000), 0.5, np.float32)  # 128 000 bytes of tensor data
        error = grpc_error(
            lambda: client.infer("rowsum", [grpc_input(big, "x")], client_timeout=TIMEOUT)
        )
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than max" in error.message() and "100000" in error.message()
        small = np.full((2, 2000), 0.5, np.float32)
        result = client.infer("rowsum", [grpc_input(small, "x")], client_timeout=TIMEOUT)
        np.testing.assert_allclose(result.as_numpy("total"), [[1000.0], [1000.0]])
    finally:
        client.close()


def test_grpc_queue_full(server: VolleyProcess) -> None:
    count = 12
    barrier = threading.Barrier(count)
    x = np.full((1, SLOW_WIDTH), 0.1, np.float32)

    def one(_: int) -> str:
        client = grpcclient.InferenceServerClient(server.grpc)
        try:
            tensor = grpc_input(x, "x")
            assert client.is_server_live()  # connected before the burst
            barrier.wait(TIMEOUT)
            try:
                client.infer("slow", [tensor], client_timeout=TIMEOUT)
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.RESOURCE_EXHAUSTED":
                    assert "queue is full" in exc.message()
                return exc.status()
            return "OK"
        finally:
            client.close()

    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(one, range(count)))
    assert set(outcomes) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, outcomes


def test_grpc_timeout(server: VolleyProcess, grpc_client: grpcclient.InferenceServerClient) -> None:
    x = np.full((1, SLOW_WIDTH), 0.1, np.float32)
    with SlowBusy(server):
        error = grpc_error(
            lambda: grpc_client.infer(
                "slow", [grpc_input(x, "x")], timeout=1000, client_timeout=TIMEOUT
            )
        )
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "timed out" in error.message()


def test_a_batched_input_without_its_batch_dimension(tmp_path: Path) -> None:
    """A model whose rows are single values ([-1]): a scalar has no batch dimension, so it is
    a 400 naming the expected shape, not a server error."""
    import onnx
    from onnx import TensorProto, helper

    model_file = tmp_path / "models" / "row" / "1" / "model.onnx"
    model_file.parent.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_file)
    (model_file.parent.parent / "config.yaml").write_text("max_batch_size: 8\n")
    with serving(tmp_path / "models") as proc:
        url = infer_url(proc, "row")
        scalar = {"name": "x", "datatype": "FP32", "shape": [], "data": [1.5]}
        assert_error(post(url, {"inputs": [scalar]}), 400, "shape []", "'row' expects [-1]")
        rows = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}
        answer = post(url, {"inputs": [rows]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [1.5, 2.5]
