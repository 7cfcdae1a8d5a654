"""Shared pieces of the fuzz tests: hypothesis settings, hostile values, and the liveness check.

Every fuzz module serves the shipped models (fraud, detector, detect) from one real server and,
after each test, proves it still serves: the process is alive, live and ready answer 200, and a
fraud request over HTTP and gRPC gives the very answer it gave before any hostile input.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import requests
from conftest import VolleyProcess
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

TIMEOUT = 60  # seconds per call: the machine is small and shared
MODELS = ("fraud", "detector", "detect")
INPUT = {
    "fraud": ("features", "FP32"),
    "detector": ("images", "FP32"),
    "detect": ("pixels", "UINT8"),
}
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
)  # fmt: skip
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4,
            "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}  # fmt: skip
FRAUD_ROW = [120.5, 13, 0, 2, 9, 31, 80.0, 75.5, 70.25, 1, 5400, 14, 95, 410, 0.0, 0.02, 0.015]

# Client mistakes, by HTTP status and gRPC code. Also the client's, with their own message:
# 501 / UNIMPLEMENTED (shared memory) and 504 / DEADLINE_EXCEEDED (a `timeout` parameter of 1 µs).
HTTP_CLIENT_ERRORS = {400, 404, 413, 429}
GRPC_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CLIENT_CAUSED = {
    501: "shared memory",
    504: "timed out",
    grpc.StatusCode.UNIMPLEMENTED: "shared memory",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timed out",
}


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible (derandomized, no example database), no deadline: the box is slow."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
    )


# JSON values of every kind, including integers past 64 bits and strings of any code point.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
huge_ints = st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100])


def fraud_body(rows: int = 1) -> dict:
    """A valid v2 JSON infer body for fraud."""
    return {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [rows, 17], "data": FRAUD_ROW * rows}
        ]
    }


def fraud_answer_http(proc: VolleyProcess) -> list:
    """Fraud's outputs for FRAUD_ROW over HTTP JSON."""
    response = requests.post(
        f"{proc.url}/v2/models/fraud/infer", json=fraud_body(), timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    return [(o["name"], o["data"]) for o in response.json()["outputs"]]


def fraud_request_pb(request_id: str = "") -> pb.ModelInferRequest:
    """A valid gRPC infer request for fraud (raw contents)."""
    request = pb.ModelInferRequest(model_name="fraud", id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 17])
    request.raw_input_contents.append(np.asarray([FRAUD_ROW], dtype="<f4").tobytes())
    return request


def fraud_answer_grpc(proc: VolleyProcess) -> list:
    """Fraud's outputs for FRAUD_ROW over gRPC."""
    with grpc.insecure_channel(proc.grpc) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = infer(fraud_request_pb(), timeout=TIMEOUT)
    return [
        (o.name, raw) for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    ]


def assert_still_serving(
    proc: VolleyProcess, baseline: tuple[list, list], ready: bool = True
) -> None:
    """The process is alive, answers health checks and gives fraud's answer unchanged."""
    assert proc.proc.poll() is None, f"server died:\n{proc.log()[-5000:]}"
    assert requests.get(f"{proc.url}/v2/health/live", timeout=TIMEOUT).status_code == 200
    if ready:
        response = requests.get(f"{proc.url}/v2/health/ready", timeout=TIMEOUT)
        assert response.status_code == 200, response.text
    assert fraud_answer_http(proc) == baseline[0]
    assert fraud_answer_grpc(proc) == baseline[1]


def baseline_answers(proc: VolleyProcess) -> tuple[list, list]:
    """Fraud's answers before any hostile input (HTTP, gRPC)."""
    return fraud_answer_http(proc), fraud_answer_grpc(proc)


def watchdog_fixtures(server: str) -> tuple[Callable, Callable]:
    """A fuzz module's `baseline` fixture (fraud's answers before any hostile input) and an
    autouse fixture that checks, after each test (a whole batch of examples), that the server
    named by fixture `server` is alive, ready and still gives those answers.

        baseline, still_serving = watchdog_fixtures("shipped")
    """

    @pytest.fixture(scope="module")
    def baseline(request: pytest.FixtureRequest) -> tuple[list, list]:
        return baseline_answers(request.getfixturevalue(server))

    @pytest.fixture(autouse=True)
    def still_serving(
        request: pytest.FixtureRequest, baseline: tuple[list, list]
    ) -> Iterator[None]:
        proc = request.getfixturevalue(server)  # before the test: pytest wants it so
        yield
        assert_still_serving(proc, baseline)

    return baseline, still_serving


def assert_http_client_error(response: requests.Response, *extra: int) -> str:
    """A client-error status with a JSON `{"error": "<non-empty message>"}` body (a response of
    `requests` or of schemathesis, whose header values are lists)."""
    body = response.content[:300]
    assert response.status_code in HTTP_CLIENT_ERRORS | set(extra), (response.status_code, body)
    content_type = response.headers.get("content-type") or response.headers.get("Content-Type")
    if isinstance(content_type, list):
        content_type = content_type[0]
    assert content_type and content_type.startswith("application/json"), (content_type, body)
    doc = json.loads(response.content)
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc
    return doc["error"]


def assert_http_answer_or_client_error(response: requests.Response, model: str) -> None:
    """Either a well-formed answer of `model` or a client error with a JSON message."""
    if response.status_code != 200:
        message = assert_http_client_error(response, 501, 504)
        assert CLIENT_CAUSED.get(response.status_code, "") in message, message
        return
    if response.headers["content-type"] == "application/json":
        doc = response.json()
    else:
        length = int(response.headers["inference-header-content-length"])
        doc = json.loads(response.content[:length])
    assert doc["model_name"] == model, doc
    assert isinstance(doc["outputs"], list) and doc["outputs"], doc


def assert_grpc_client_error(error: grpc.RpcError) -> str:
    """A client-error gRPC status with a message (see CLIENT_CAUSED)."""
    code, details = error.code(), error.details() or ""
    assert code in GRPC_CLIENT_ERRORS, (code, details)
    assert details, code
    assert CLIENT_CAUSED.get(code, "") in details, details
    return details


# Images: valid files of every accepted format, and headers that lie.


def encoded_image(fmt: str, width: int = 48, height: int = 32, seed: int = 0, **kw) -> bytes:
    """A small random RGB image encoded as `fmt` (Pillow's format name)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **kw)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a few bytes of (wrong) pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def bmp_declaring(width: int, height: int) -> bytes:
    """A BMP whose header declares width x height (negative height: top-down), data short."""
    data = bytearray(encoded_image("BMP", 4, 4))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


VALID_IMAGES = {fmt: encoded_image(fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP")}
MAX_IMAGE_PIXELS = 40_000_000  # models/detect/config.yaml
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"GIF89a", b"II*\0")


@st.composite
def hostile_images(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(image bytes, whether they must be refused): random, truncated, bit-flipped, lying."""
    kind = draw(st.sampled_from(["random", "magic", "truncated", "flipped", "declared"]))
    if kind == "random":
        return draw(st.binary(max_size=2048)), True
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=512)), True
    valid = VALID_IMAGES[draw(st.sampled_from(sorted(VALID_IMAGES)))]
    if kind == "truncated":
        cut = draw(st.integers(0, len(valid) - 1))
        return valid[:cut], cut < 32  # a long enough prefix may still decode (grey tail)
    if kind == "flipped":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data), False  # a flip in the pixel data still decodes
    side = st.integers(1, 2**31 - 1)
    width, height = draw(side), draw(side)
    over_limit = width * height > MAX_IMAGE_PIXELS  # refused from the header alone
    if draw(st.booleans()):
        return png_declaring(width, height), over_limit
    return bmp_declaring(width, -height), over_limit


@st.composite
def impossible_shapes(draw: st.DrawFn, int64: bool) -> list[int]:
    """Shapes no tensor has: a negative or past-int64 dimension, too many dimensions, or a
    product past what any array can index (even with a 0 somewhere). `int64`: every dimension
    fits in an int64 (as in protobuf)."""
    kinds = ["negative", "too_many", "overflowing"] + ([] if int64 else ["past_int64"])
    kind = draw(st.sampled_from(kinds))
    if kind == "too_many":
        return [1] * draw(st.integers(33, 200))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))
    if kind == "negative":
        bad = draw(st.integers(-(2**63) if int64 else -(2**70), -1))
    elif kind == "past_int64":
        bad = draw(st.integers(2**63, 2**70))
    else:
        bad = draw(st.integers(2**62, 2**63 - 1))
        shape.append(draw(st.integers(4, 2**62)))
    shape.insert(draw(st.integers(0, len(shape))), bad)
    return shape
