"""Every queue is bounded: past its bound a request is refused at once (429 /
RESOURCE_EXHAUSTED with a message), never queued without limit."""

from __future__ import annotations

import hashlib
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import onnx_models
import orjson
import requests
import tritonclient.grpc as grpcclient
import yaml
from conftest import ROOT, copy_shipped_models, serving
from metrics_scrape import scrape, total
from test_http_connection import Connection
from test_http_errors import inflight
from tritonclient.utils import InferenceServerException

from server.errors import ErrorKind, VolleyError
from server.ratelimit import MAX_CLIENTS, WAYS, SharedRateLimiter

TIMEOUT = 60
IMAGE = (ROOT / "docs" / "samples" / "street-1.jpg").read_bytes()


def test_a_detection_pipeline_bounds_requests_in_progress(tmp_path: Path) -> None:
    """`max_queue_size: 1` on the detect pipeline: of 8 simultaneous images, the ones that
    arrive while another is in progress get 429 at once; the rest are answered."""
    root = copy_shipped_models(tmp_path)
    config_file = root / "detect" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "max_queue_size": 1}))
    with serving(root, "--metrics-port", "0") as proc:
        url = proc.url + "/v2/models/detect/infer"
        header = orjson.dumps(
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                         "parameters": {"binary_data_size": 4 + len(IMAGE)}}]}
        )  # fmt: skip
        body = header + struct.pack("<I", len(IMAGE)) + IMAGE

        def detect(_: int) -> requests.Response:
            headers = {"inference-header-content-length": str(len(header))}
            return requests.post(url, data=body, headers=headers, timeout=TIMEOUT)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(detect, range(8)))
        codes = sorted(r.status_code for r in replies)
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
        refused = next(r for r in replies if r.status_code == 429)
        assert "requests in progress (max_queue_size 1)" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        metadata = requests.get(proc.url + "/v2/models/detect/config", timeout=TIMEOUT).json()
        assert metadata["parameters"]["max_queue_size"] == {"string_value": "1"}


def test_an_unbounded_queue_cannot_be_configured(tmp_path: Path) -> None:
    """Triton's `max_queue_size: 0` (unbounded) is refused in config.yaml, naming the field."""
    root = tmp_path / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", hidden=16)
    onnx_models.write_config(
        root / "mlp", {"max_batch_size": 8, "dynamic_batching": {"max_queue_size": 0}}
    )
    with serving(root, "--metrics-port", "0", "--no-strict-readiness") as proc:
        index = requests.post(proc.url + "/v2/repository/index", timeout=TIMEOUT).json()
        (row,) = index
        assert row["state"] == "UNAVAILABLE"
        assert "max_queue_size" in row["reason"] and "greater than or equal to 1" in row["reason"]


def test_a_client_over_its_rate_limit_gets_429(tmp_path: Path) -> None:
    """--rate-limit 4 --rate-burst 4: a burst of 12 from one address gets 4 answers and 8
    refusals on HTTP and gRPC alike (one bucket per address); a second later it may go on."""
    root = copy_shipped_models(tmp_path)
    with serving(root, "--rate-limit", "4", "--rate-burst", "4") as proc:
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 17],
                            "data": [0.5] * 17}]}  # fmt: skip
        url = proc.url + "/v2/models/fraud/infer"
        codes = [requests.post(url, json=body, timeout=TIMEOUT).status_code for _ in range(6)]
        client = grpcclient.InferenceServerClient(proc.grpc)
        tensor = grpcclient.InferInput("features", [1, 17], "FP32")
        tensor.set_data_from_numpy(np.full((1, 17), 0.5, np.float32))
        for _ in range(6):
            try:
                client.infer("fraud", [tensor])
                codes.append(200)
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
                assert "over its rate limit of 4 requests/s" in exc.message()
                codes.append(429)
        assert codes.count(200) in (4, 5), codes  # 4, and a token may refill meanwhile
        reply = requests.post(url, json=body, timeout=TIMEOUT)
        assert reply.status_code == 429 and "rate limit" in reply.json()["error"]
        assert reply.headers["retry-after"] == "1"
        time.sleep(1.1)
        assert requests.post(url, json=body, timeout=TIMEOUT).status_code == 200
        client.close()
        samples = scrape(f"http://127.0.0.1:{proc.metrics_port}/metrics")
        refused = total(samples, "volley_requests_total", model="fraud", outcome="rate_limited")
        assert refused == codes.count(429) + 1


def test_workers_share_one_table_of_buckets(tmp_path: Path) -> None:
    """Two `SharedRateLimiter`s on one file, as two workers map it: a client's burst is spent
    once across both, another client's bucket is its own, and a client whose set of slots is
    full takes the least recently seen one (that client comes back with a full bucket)."""
    table = tmp_path / "rate-limits"
    first, second = SharedRateLimiter(table, 0.001, 3), SharedRateLimiter(table, 0.001, 3)
    allowed = []
    for limiter in (first, second, first, second):
        try:
            limiter.check("10.0.0.1")
            allowed.append(True)
        except VolleyError as exc:
            assert exc.kind is ErrorKind.RATE_LIMITED
            allowed.append(False)
    assert allowed == [True, True, True, False]
    second.check("10.0.0.2")  # a bucket of its own

    # fill 10.0.0.1's set with other clients: it is the least recently seen, so it goes first
    def table_set(client: str) -> int:
        digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % (MAX_CLIENTS // WAYS)

    others = (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(1 << 16, 1 << 22))
    same_set = list(islice((c for c in others if table_set(c) == table_set("10.0.0.1")), WAYS))
    assert len(same_set) == WAYS
    for client in same_set:
        first.check(client)
    second.check("10.0.0.1")  # forgotten: a full bucket again


def test_a_full_model_refuses_from_the_headers(tmp_path: Path) -> None:
    """While `slow` (one instance, max_queue_size 1) runs one request and queues another, an
    infer request to it gets 429 / RESOURCE_EXHAUSTED before its body is read or decoded: a
    body that is not even JSON is refused as full, not as malformed, over HTTP and gRPC. The
    keep-alive connection reads past the dropped body and serves the next request on it; a
    body over 1 MiB, or one held back by `Expect: 100-continue`, gets its 429 and the
    connection closes after it. Each refusal counts as queue_full under the model's version."""
    root = tmp_path / "models"
    onnx_models.slow(root / "slow" / "1" / "model.onnx", iterations=300_000)  # seconds a run
    onnx_models.write_config(
        root / "slow",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 1}, "intra_op_threads": 1},
    )
    slow_body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 512], "data": [0.1] * 512}]}
    )
    garbage = b"this is not JSON"

    def head(length: int, extra: str = "") -> bytes:
        return (
            f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: test\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n"
        ).encode()

    with serving(root) as proc:
        url = proc.url + "/v2/models/slow/infer"
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(requests.post, url, data=slow_body, timeout=TIMEOUT)
            time.sleep(0.3)  # taken off the queue by the instance thread
            queued = pool.submit(requests.post, url, data=slow_body, timeout=TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while inflight(proc) < 2:
                assert time.monotonic() < deadline and not queued.done(), queued
                time.sleep(0.01)

            kept = Connection(proc)
            for _ in range(2):  # the second request on the connection is read past the first
                kept.send(head(len(garbage)) + garbage)
                status, headers, body = kept.response()
                assert status == 429 and "connection" not in headers, (status, headers)
                assert "model 'slow' queue is full" in orjson.loads(body)["error"]
                assert headers["retry-after"] == "1"

            client = grpcclient.InferenceServerClient(proc.grpc)
            unknown = grpcclient.InferInput("not-an-input", [1, 3], "INT8")
            unknown.set_data_from_numpy(np.zeros((1, 3), np.int8))
            try:
                client.infer("slow", [unknown], client_timeout=TIMEOUT)
                raise AssertionError("a full model answered")
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
                assert "queue is full" in exc.message()
            client.close()

            for request in (
                head(2 << 20) + bytes(65536),  # more than DISCARD_BYTES to come
                head(len(garbage), "Expect: 100-continue\r\n"),  # the body waits for a 100
            ):
                closing = Connection(proc)
                closing.send(request)
                status, headers, _ = closing.response()
                assert status == 429 and headers["connection"] == "close", (status, headers)
                assert closing.closed_by_server()
                closing.close()
            assert running.result().status_code == 200
            assert queued.result().status_code == 200

        kept.send(head(len(garbage)) + garbage)  # room again: now it is decoded, and refused
        status, _, body = kept.response()
        assert status == 400 and "malformed JSON" in orjson.loads(body)["error"], body
        kept.close()
        samples = scrape(f"http://127.0.0.1:{proc.metrics_port}/metrics")
        for protocol, count in (("http", 4), ("grpc", 1)):
            refused = total(
                samples, "volley_requests_total", model="slow", version="1",
                protocol=protocol, outcome="queue_full",
            )  # fmt: skip
            assert refused == count, (protocol, refused)
