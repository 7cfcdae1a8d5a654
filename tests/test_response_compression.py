"""Compressed infer answers (`Accept-Encoding`), as tritonclient's
`response_compression_algorithm` asks for them: the same outputs whichever way they travel,
really compressed when asked and worth it, never when not asked or too small."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from conftest import VolleyProcess

from server.protocol.response_compression import chosen_encoding

TIMEOUT = 30
ROWS = 256  # a JSON answer of several KB


@pytest.fixture(scope="module")
def client(shipped: VolleyProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(shipped.http)
    yield client
    client.close()


def fraud_inputs(binary: bool) -> list[httpclient.InferInput]:
    rows = np.random.default_rng(3).random((ROWS, 17), np.float32) * 100
    tensor = httpclient.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return [tensor]


@pytest.mark.parametrize("binary", [False, True])
def test_compressed_answers_carry_the_same_outputs(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("score", "is_fraud")]  # fmt: skip
    plain = client.infer("fraud", fraud_inputs(binary), outputs=outputs)
    for algorithm in ("gzip", "deflate"):
        got = client.infer(
            "fraud", fraud_inputs(binary), outputs=outputs,
            response_compression_algorithm=algorithm,
        )  # fmt: skip
        for name in ("score", "is_fraud"):
            np.testing.assert_array_equal(got.as_numpy(name), plain.as_numpy(name))


def raw_answer(volley: VolleyProcess, rows: int, accept: str | None) -> requests.Response:
    data = np.random.default_rng(4).random((rows, 17), np.float32).round(3).tolist()
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [rows, 17],
                        "data": data}]}  # fmt: skip
    headers = {"Accept-Encoding": accept} if accept is not None else {"Accept-Encoding": ""}
    return requests.post(
        f"{volley.url}/v2/models/fraud/infer", json=body, headers=headers, timeout=TIMEOUT,
        stream=True,
    )  # fmt: skip


def test_an_answer_is_compressed_only_when_asked_and_worth_it(shipped: VolleyProcess) -> None:
    plain = raw_answer(shipped, ROWS, None)
    plain_body = plain.raw.read()
    assert "content-encoding" not in plain.headers and len(plain_body) > 4096
    for accept, encoding, decode in (
        ("gzip", "gzip", gzip.decompress),
        ("deflate", "deflate", zlib.decompress),
        ("br, deflate;q=0.5", "deflate", zlib.decompress),
        ("gzip;q=0, deflate", "deflate", zlib.decompress),
    ):
        answer = raw_answer(shipped, ROWS, accept)
        raw = answer.raw.read(decode_content=False)
        assert answer.headers["content-encoding"] == encoding, accept
        assert int(answer.headers["content-length"]) == len(raw) < len(plain_body) / 2
        assert decode(raw) == plain_body
    for accept in ("br", "gzip;q=0", "identity"):
        answer = raw_answer(shipped, ROWS, accept)
        assert "content-encoding" not in answer.headers, accept
    small = raw_answer(shipped, 1, "gzip")  # one row: about 200 bytes, not worth it
    assert "content-encoding" not in small.headers


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (b"", None),
        (b"gzip", b"gzip"),
        (b"GZIP", b"gzip"),
        (b"deflate, gzip", b"gzip"),
        (b"gzip;q=0.0, deflate;q=0.2", b"deflate"),
        (b"br;q=1.0, zstd", None),
        (b"gzip;q=nonsense", None),
        (b"*", None),
    ],
)
def test_the_encoding_chosen_from_accept_encoding(header: bytes | None, expected: bytes) -> None:
    assert chosen_encoding(header) == expected
