"""Volley's own HTTP/2 gRPC server (`server/protocol/http2.py`, `server/grpc_server.py`) against
grpcio's client (through tritonclient and raw channels) and raw sockets: flow control both ways,
compression, many calls on one connection, cancellation, metadata that changes from call to
call, and bytes that are not HTTP/2. After every test the server still answers."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import grpc
import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from conftest import VolleyProcess, serving
from http2_wire import PREFACE, frame, frames_in, literal_headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from server.protocol.http2 import PREFACE_TIMEOUT_S

SERVICE = "/inference.GRPCInferenceService/"
BIG = (1024, 1024)  # 4 MiB of FP32 each way: past every default HTTP/2 window
INFER_KEY = "transport-test-key-0123456789"


@pytest.fixture(scope="module")
def volley(tmp_path_factory: pytest.TempPathFactory) -> VolleyProcess:
    root = tmp_path_factory.mktemp("transport")
    models = root / "models"
    onnx_models.fixed_scale(models / "scale" / "1" / "model.onnx", shape=BIG, factor=3.0)
    onnx_models.mlp(models / "mlp" / "1" / "model.onnx", features=8, hidden=16)
    onnx_models.write_config(
        models / "mlp", {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 500}}
    )
    keys = root / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: app, key: {INFER_KEY}, scope: infer}}\n")
    with serving(models, "--api-keys", str(keys), "--host", "127.0.0.1") as proc:
        yield proc


@pytest.fixture(autouse=True)
def still_serving(volley: VolleyProcess):
    """Every test ends with the server answering correctly."""
    yield
    x = np.ones((1, 8), np.float32)
    with grpcclient.InferenceServerClient(volley.grpc) as client:
        result = client.infer("mlp", [_input(x)], headers=AUTH)
        assert result.as_numpy("score").shape[0] == 1
    assert "Traceback" not in volley.log()


AUTH = {"authorization": f"Bearer {INFER_KEY}"}


def _input(x: np.ndarray, name: str = "input") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_large_messages_flow_both_ways(volley: VolleyProcess) -> None:
    """4 MiB in and 4 MiB out: the request needs the server to reopen the client's window
    as it reads, the answer has to wait for the client's window to reopen."""
    x = np.random.default_rng(0).random(BIG, np.float32)
    with grpcclient.InferenceServerClient(volley.grpc) as client:
        for _ in range(3):
            result = client.infer("scale", [_input(x, "x")], headers=AUTH, client_timeout=60)
            np.testing.assert_allclose(result.as_numpy("y"), x * 3.0, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(volley: VolleyProcess, algorithm: str) -> None:
    x = np.random.default_rng(1).random(BIG, np.float32).round(1)  # compresses well
    with grpcclient.InferenceServerClient(volley.grpc) as client:
        result = client.infer(
            "scale", [_input(x, "x")], headers=AUTH, compression_algorithm=algorithm
        )
    np.testing.assert_allclose(result.as_numpy("y"), x * 3.0, rtol=1e-6)


def test_thousands_of_calls_on_one_connection(volley: VolleyProcess) -> None:
    """More calls at once than a connection takes streams (1,024): the client queues the rest
    as the server's SETTINGS ask; every call is answered, each with its own rows."""
    calls = 3000
    rows = np.random.default_rng(2).random((calls, 1, 8), np.float32)

    async def run() -> list[np.ndarray]:
        client = aiogrpcclient.InferenceServerClient(volley.grpc)
        try:
            results = await asyncio.gather(
                *(client.infer("mlp", [_input(row)], headers=AUTH) for row in rows)
            )
        finally:
            await client.close()
        return [r.as_numpy("score") for r in results]

    outputs = asyncio.run(run())
    with grpcclient.InferenceServerClient(volley.grpc) as client:
        for i in (0, calls // 2, calls - 1):
            alone = client.infer("mlp", [_input(rows[i])], headers=AUTH).as_numpy("score")
            np.testing.assert_allclose(outputs[i], alone, rtol=1e-5, atol=1e-6)


def test_metadata_that_changes_between_calls(volley: VolleyProcess) -> None:
    """On one connection, keys alternate between valid, wrong and absent while custom metadata
    grows grpc-core's HPACK table (header blocks then mix table references and new entries):
    each call gets the answer its own key deserves."""
    x = np.ones((1, 8), np.float32)
    with grpcclient.InferenceServerClient(volley.grpc) as client:
        for i in range(120):
            kind = i % 3
            headers = {"x-request-note": f"call-{i}"}
            if kind == 0:
                headers |= AUTH
            elif kind == 1:
                headers["authorization"] = f"Bearer wrong-key-{i:06d}-0123456789"
            if kind == 0:
                assert (
                    client.infer("mlp", [_input(x)], headers=headers).as_numpy("score") is not None
                )
            else:
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("mlp", [_input(x)], headers=headers)
                assert caught.value.status() == "StatusCode.UNAUTHENTICATED", (i, caught.value)


def test_cancelled_calls_and_unknown_methods(volley: VolleyProcess) -> None:
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=list(BIG))
    request.raw_input_contents.append(np.zeros(BIG, np.float32).tobytes())
    metadata = (("authorization", AUTH["authorization"]),)
    with grpc.insecure_channel(volley.grpc) as channel:
        infer = channel.unary_unary(SERVICE + "ModelInfer")
        futures = [infer.future(request.SerializeToString(), metadata=metadata) for _ in range(20)]
        for future in futures:
            future.cancel()  # RST_STREAM, most of them mid-upload
        unknown = channel.unary_unary(SERVICE + "NoSuchMethod")
        with pytest.raises(grpc.RpcError) as caught:
            unknown(b"", metadata=metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "NoSuchMethod" in caught.value.details()


def test_a_message_past_the_limit_is_refused_from_its_length(volley: VolleyProcess) -> None:
    """A message whose declared length passes the limit is refused from its first bytes."""
    with socket.create_connection(_address(volley)) as sock:
        sock.settimeout(10)
        sock.sendall(PREFACE + frame(4, 0, 0, b""))
        block = literal_headers(
            [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "ModelInfer"),
             (":authority", "x"), ("content-type", "application/grpc"),
             ("authorization", AUTH["authorization"])]
        )  # fmt: skip
        sock.sendall(frame(1, 0x4, 1, block) + frame(0, 0, 1, b"\x00" + struct.pack(">I", 2**31)))
        received = _read_until_closed_or(sock, b"grpc-status")
    assert b"grpc-status\x018" in received  # RESOURCE_EXHAUSTED, a literal header
    assert b"larger than max" in received


def test_a_request_that_trickles_in_a_few_bytes_at_a_time(volley: VolleyProcess) -> None:
    """Frames split across many reads (a slow link) are reassembled: the call succeeds."""
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[64, 8])
    request.raw_input_contents.append(np.ones((64, 8), np.float32).tobytes())
    message = request.SerializeToString()
    block = literal_headers(
        [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "ModelInfer"),
         (":authority", "x"), ("content-type", "application/grpc"),
         ("authorization", AUTH["authorization"])]
    )  # fmt: skip
    wire = (
        PREFACE
        + frame(4, 0, 0, b"")
        + frame(1, 0x4, 1, block)
        + frame(0, 0x1, 1, b"\x00" + struct.pack(">I", len(message)) + message)
    )
    with socket.create_connection(_address(volley)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        for at in range(0, len(wire), 7):
            sock.sendall(wire[at : at + 7])
        received = _read_until_closed_or(sock, b"grpc-status")
    assert b"grpc-status\x010" in received  # OK


def test_a_call_ended_while_the_client_still_sends_is_reset_after_its_trailers(
    volley: VolleyProcess,
) -> None:
    """A call the server ends before the client's END_STREAM (refused from its headers here; a
    camera stream at shutdown is the same) gets RST_STREAM(NO_ERROR) right after its trailers:
    a gRPC client counts the call complete only then, so a connection closed just after would
    otherwise fail the answered call. A call the client ended gets no reset."""
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
    message = request.SerializeToString()

    def headers(method: str) -> bytes:
        return literal_headers(
            [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + method),
             (":authority", "x"), ("content-type", "application/grpc"),
             ("authorization", AUTH["authorization"])]
        )  # fmt: skip

    with socket.create_connection(_address(volley)) as sock:
        sock.settimeout(10)
        sock.sendall(
            PREFACE
            + frame(4, 0, 0, b"")
            + frame(1, 0x4, 1, headers("NoSuchMethod"))  # END_HEADERS, not END_STREAM
            + frame(1, 0x4, 3, headers("ModelInfer"))
            + frame(0, 0x1, 3, b"\x00" + struct.pack(">I", len(message)) + message)
        )
        received = _read_until_closed_or(sock, b"grpc-status\x010")
        sock.sendall(frame(6, 0, 0, b"in-order"))  # PING: its ACK comes after all of the above
        received += _read_until_closed_or(sock, b"in-order")
    sent = [(kind, stream, bytes(payload)) for kind, stream, payload, _ in frames_in(received)]
    on_first = [(kind, payload) for kind, stream, payload in sent if stream == 1]
    assert [kind for kind, _ in on_first] == [1, 3]  # trailers-only HEADERS, then RST_STREAM
    assert b"grpc-status\x0212" in on_first[0][1]  # UNIMPLEMENTED
    assert on_first[1][1] == b"\x00\x00\x00\x00"  # NO_ERROR
    assert 3 not in [kind for kind, stream, _ in sent if stream == 3]


def test_the_connection_window_comes_back_a_quarter_at_a_time(volley: VolleyProcess) -> None:
    """A client may send far more than the connection's window on one connection (20 MB of
    1 MB calls through a 16 MiB window): the server gives the window back as it reads, in a
    few large WINDOW_UPDATEs, not one per read (each is a write and a wake-up of the client:
    gRPC at c=64 served 7-21 % more requests without them, bench/RESULTS.md)."""
    message = b"\x00" * 1_000_000  # not a ModelInferRequest: each call fails, after its read
    headers = literal_headers(
        [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "ModelInfer"),
         (":authority", "x"), ("content-type", "application/grpc"),
         ("authorization", AUTH["authorization"])]
    )  # fmt: skip
    body = b"\x00" + struct.pack(">I", len(message)) + message
    calls = 20
    window, updates, received, at = 65_535, [], b"", 0
    with socket.create_connection(_address(volley)) as sock:
        sock.settimeout(10)
        sock.sendall(PREFACE + frame(4, 0, 0, b""))

        def read_more() -> None:
            nonlocal window, received, at
            chunk = sock.recv(1 << 16)
            assert chunk, "the server closed the connection"
            received += chunk
            for kind, stream, payload, end in frames_in(received, at):
                at = end
                if kind == 8 and stream == 0:  # WINDOW_UPDATE of the connection
                    updates.append(int.from_bytes(payload, "big"))
                    window += updates[-1]

        for call in range(calls):
            while window < len(body):  # a client may send only what the window allows
                read_more()
            stream = 2 * call + 1
            sock.sendall(frame(1, 0x4, stream, headers))
            for offset in range(0, len(body), 16_384):
                last = offset + 16_384 >= len(body)
                sock.sendall(frame(0, 0x1 if last else 0, stream, body[offset : offset + 16_384]))
            window -= len(body)
        while received.count(b"grpc-status") < calls:
            read_more()
    assert received.count(b"grpc-status\x0213") + received.count(b"grpc-status\x013") == calls
    # the first update opens the window to 16 MiB; then one per 4 MiB read
    assert len(updates) <= 1 + calls * len(body) // (4 << 20), updates


def test_a_connection_that_is_not_http2_is_closed(volley: VolleyProcess) -> None:
    with socket.create_connection(_address(volley)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_until_closed_or(sock, None)


def test_a_connection_that_never_speaks_is_closed(volley: VolleyProcess) -> None:
    """A socket that sends no preface does not hold its file descriptor forever."""
    with socket.create_connection(_address(volley)) as sock:
        sock.settimeout(PREFACE_TIMEOUT_S + 10)
        started = time.monotonic()
        _read_until_closed_or(sock, None)
    assert time.monotonic() - started >= PREFACE_TIMEOUT_S - 1


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(min_size=1, max_size=300))
def test_random_frames_never_break_the_server(volley: VolleyProcess, garbage: bytes) -> None:
    """Random bytes after a valid preface and SETTINGS: the server answers, ignores or closes
    the connection; it never stops serving others (checked after each test)."""
    with socket.create_connection(_address(volley)) as sock:
        sock.settimeout(5)
        sock.sendall(PREFACE + frame(4, 0, 0, b"") + garbage)
        sock.shutdown(socket.SHUT_WR)
        _read_until_closed_or(sock, None)


def _address(volley: VolleyProcess) -> tuple[str, int]:
    host, port = volley.grpc.rsplit(":", 1)
    return host, int(port)


def _read_until_closed_or(sock: socket.socket, marker: bytes | None) -> bytes:
    """Read until the server closes (or `marker` arrives); a timeout fails the test."""
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
        if marker is not None and marker in received:
            return received
