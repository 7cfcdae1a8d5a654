"""HTTP/1.1 connection behaviour of the infer route, which Volley's own connection protocol
serves (server/http_connection.py): pipelining, Expect: 100-continue, HTTP/1.0, bodies that
arrive in pieces or never, large answers, and generated pipelines of requests in every framing
cut into arbitrary writes. Raw sockets, so every byte on the wire is checked.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import requests
import tritonclient.http as httpclient
from conftest import VolleyProcess, build_repository, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_close, ort_outputs

MLP = "mlp/versions/1"
SCALE_SHAPE = (256, 256)  # 256 KiB of FP32 out: past the size answered in one buffer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared test repository plus `scale`, whose answers are large."""
    root = build_repository(tmp_path_factory.mktemp("connection") / "models")
    onnx_models.fixed_scale(root / "scale" / "1" / "model.onnx", SCALE_SHAPE, 2.0)
    return root


@pytest.fixture(scope="module")
def volley(models: Path) -> Iterator[VolleyProcess]:
    with serving(models) as proc:
        yield proc


class Connection:
    """One keep-alive TCP connection that reads HTTP/1.1 responses exactly."""

    def __init__(self, server: VolleyProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-head: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """Whether the server closes the connection (with nothing more sent)."""
        try:
            return not self._fill() and not self.buffer
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def infer_request(
    model: str, rows: np.ndarray, extra_headers: str = "", version: str = "1.1"
) -> tuple[bytes, bytes]:
    """The head and body of a v2 JSON infer request for the mlp test model (`model` may name a
    version: "mlp/versions/1")."""
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                     "data": rows.reshape(-1).tolist()}]}
    ).encode()  # fmt: skip
    head = (
        f"POST /v2/models/{model}/infer HTTP/{version}\r\nHost: test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n"
    ).encode()
    return head, body


def scores(body: bytes) -> np.ndarray:
    (output,) = json.loads(body)["outputs"]
    return np.array(output["data"], np.float32).reshape(output["shape"])


def rows(seed: int, count: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 32), np.float32)


def expected(models: Path, data: np.ndarray) -> np.ndarray:
    """ONNX Runtime's scores for `data` from the model MLP names."""
    return ort_outputs(models / "mlp" / "1" / "model.onnx", {"input": data})["score"]


def test_pipelined_requests_are_answered_in_order(volley: VolleyProcess, models: Path) -> None:
    """Requests sent back to back in one write (infer, a control route, infer, a refusal) are
    answered one by one, in the order sent, on the same connection."""
    first, second = rows(1), rows(2, count=3)
    conn = Connection(volley)
    a_head, a_body = infer_request(MLP, first)
    b_head, b_body = infer_request(MLP, second)
    missing_head, missing_body = infer_request("no-such-model", first)
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: test\r\n\r\n"
    conn.send(a_head + a_body + ready + b_head + b_body + missing_head + missing_body)

    status, headers, body = conn.response()
    assert (status, headers["content-type"]) == (200, "application/json")
    assert_close(scores(body), expected(models, first))
    status, _, body = conn.response()
    assert (status, json.loads(body)) == (200, {"ready": True})
    status, _, body = conn.response()
    assert status == 200
    assert_close(scores(body), expected(models, second))
    status, _, body = conn.response()
    assert status == 404 and "no-such-model" in json.loads(body)["error"]
    # and the connection stays open for more
    conn.send(a_head + a_body)
    assert conn.response()[0] == 200
    conn.close()


def test_expect_100_continue(volley: VolleyProcess, models: Path) -> None:
    """A client that asks before sending its body gets `100 Continue`, then the answer."""
    data = rows(3)
    head, body = infer_request(MLP, data, "Expect: 100-continue\r\n")
    conn = Connection(volley)
    conn.send(head)
    while b"\r\n\r\n" not in conn.buffer:
        assert conn._fill()
    interim, conn.buffer = conn.buffer.split(b"\r\n\r\n", 1)
    assert interim == b"HTTP/1.1 100 Continue"
    conn.send(body)
    status, _, answer = conn.response()
    assert status == 200
    assert_close(scores(answer), expected(models, data))
    conn.close()


@pytest.mark.parametrize(
    ("version", "extra"), [("1.0", ""), ("1.1", "Connection: close\r\n")], ids=["1.0", "close"]
)
def test_the_connection_closes_after_the_answer_when_asked(
    volley: VolleyProcess, version: str, extra: str
) -> None:
    """HTTP/1.0 without keep-alive, or a client's `Connection: close`: answer, then close."""
    head, body = infer_request(MLP, rows(4), extra, version=version)
    conn = Connection(volley)
    conn.send(head + body)
    status, headers, _ = conn.response()
    assert status == 200 and headers["connection"] == "close"
    assert conn.closed_by_server()


def test_a_body_that_arrives_in_pieces(volley: VolleyProcess, models: Path) -> None:
    """A body trickling in (Content-Length, then chunked transfer encoding) is read whole."""
    data = rows(5, count=2)
    head, body = infer_request(MLP, data)
    conn = Connection(volley)
    conn.send(head)
    for start in range(0, len(body), 100):
        time.sleep(0.01)
        conn.send(body[start : start + 100])
    status, _, answer = conn.response()
    assert status == 200
    assert_close(scores(answer), expected(models, data))

    chunked_head = head.replace(
        f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked"
    )
    conn.send(chunked_head)
    for start in range(0, len(body), 300):
        piece = body[start : start + 300]
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.01)
    conn.send(b"0\r\n\r\n")
    status, _, answer = conn.response()
    assert status == 200
    assert_close(scores(answer), expected(models, data))
    conn.close()


def test_a_client_gone_mid_body_costs_nothing(volley: VolleyProcess, models: Path) -> None:
    """Connections dropped halfway through a body (or right after sending it) leave the server
    serving, with nothing in its log about them."""
    data = rows(6)
    head, body = infer_request(MLP, data)
    for cut in (len(body) // 2, len(body)):
        for _ in range(20):
            conn = Connection(volley)
            conn.send(head + body[:cut])
            conn.close()
    reply = requests.post(
        f"{volley.url}/v2/models/{MLP}/infer", data=body, timeout=30,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert reply.status_code == 200
    assert_close(scores(reply.content), expected(models, data))
    assert "Traceback" not in volley.log()


def test_a_refusal_before_the_body_closes_the_connection(volley: VolleyProcess) -> None:
    """A request refused before its body is read (here: a JSON part larger than the whole
    body) is answered, then the connection closes: the unread rest is never parsed as a request."""
    head, body = infer_request(MLP, rows(7), "Inference-Header-Content-Length: 999999\r\n")
    conn = Connection(volley)
    conn.send(head + body)
    status, headers, answer = conn.response()
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(answer)["error"]
    assert headers["connection"] == "close"
    assert conn.closed_by_server()


@pytest.mark.parametrize("binary", [True, False])
def test_a_large_answer_arrives_whole(volley: VolleyProcess, binary: bool) -> None:
    """An answer far larger than a socket buffer (256 KiB binary, ~1.7 MB JSON) arrives intact."""
    data = np.random.default_rng(8).random(SCALE_SHAPE, np.float32)
    client = httpclient.InferenceServerClient(volley.http)
    tensor = httpclient.InferInput("x", list(SCALE_SHAPE), "FP32")
    tensor.set_data_from_numpy(data, binary_data=True)
    wanted = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("scale", [tensor], outputs=[wanted])
    np.testing.assert_array_equal(result.as_numpy("y"), data * 2)
    client.close()


def test_draining_answers_close_their_connection(tmp_path: Path) -> None:
    """After SIGTERM an infer request on a kept-alive connection is refused with 503 and the
    connection closes, so the client's next request goes to a server that is staying up."""
    root = build_repository(tmp_path / "models")
    with serving(root) as proc:
        head, body = infer_request(MLP, rows(9))
        conn = Connection(proc)
        conn.send(head + body)
        status, headers, _ = conn.response()
        assert status == 200 and "connection" not in headers
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while requests.get(f"{proc.url}/v2/health/ready", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "readiness never went false"
            time.sleep(0.02)
        conn.send(head + body)
        status, headers, answer = conn.response()
        assert status == 503 and "shutting down" in json.loads(answer)["error"]
        assert headers["connection"] == "close"
        assert conn.closed_by_server()


def test_idle_connections_close_after_the_keepalive_timeout(models: Path) -> None:
    """`--http-keepalive-timeout`: a connection idle that long after its last answer is closed;
    one that keeps sending requests stays open however long it lives, and closes once it too
    has been idle for the timeout (measured from its own last answer)."""
    timeout = 0.8
    with serving(models, "--http-keepalive-timeout", str(timeout)) as proc:
        head, body = infer_request(MLP, rows(11))
        idle, busy = Connection(proc), Connection(proc)
        idle.send(head + body)
        assert idle.response()[0] == 200
        idle_answered = time.monotonic()
        for _ in range(12):  # 2.4 s of requests 0.2 s apart: three timeouts' worth
            busy.send(head + body)
            status, _, answer = busy.response()
            assert status == 200
            assert_close(scores(answer), expected(models, rows(11)))
            busy_answered = time.monotonic()
            time.sleep(0.2)
        idle_closed = idle.closed_by_server()  # closed long ago: returns at once
        assert idle_closed
        assert busy.closed_by_server()
        busy_closed = time.monotonic()
        assert timeout - 0.05 <= busy_closed - busy_answered <= timeout + 1.0
    assert busy_closed - idle_answered > 2 * timeout  # the busy one outlived the idle one


def test_the_idle_connection_closes_on_time(models: Path) -> None:
    """Closed no sooner than the timeout after the last answer, and not much later."""
    timeout = 0.8
    with serving(models, "--http-keepalive-timeout", str(timeout)) as proc:
        head, body = infer_request(MLP, rows(12))
        conn = Connection(proc)
        for _ in range(2):
            conn.send(head + body)
            assert conn.response()[0] == 200
            answered = time.monotonic()
            time.sleep(timeout / 2)  # a second request inside the timeout: still open
        assert conn.closed_by_server()
        assert timeout - 0.05 <= time.monotonic() - answered <= timeout + 1.0


def _chunked(body: bytes, cuts: list[int], upper: bool, extension: bool) -> bytes:
    """`body` in chunked transfer coding, cut at `cuts`, hex sizes in either case, chunk
    extensions (which a server must ignore) if `extension`."""
    edges = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    out = b""
    for start, end in zip(edges, edges[1:], strict=False):
        size = f"{end - start:X}" if upper else f"{end - start:x}"
        out += size.encode() + (b";part=yes" if extension else b"") + b"\r\n"
        out += body[start:end] + b"\r\n"
    return out + b"0\r\n\r\n"


@st.composite
def framed_request(draw: st.DrawFn, seed: int) -> tuple[bytes, int, np.ndarray | None]:
    """One request framed as clients may frame it: (wire bytes, expected status, the rows of
    an infer request or None)."""
    kind = draw(st.sampled_from(["json", "json", "binary", "ready", "metadata"]))
    if kind == "ready":
        return b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n", 200, None
    if kind == "metadata":
        return b"GET /v2/models/mlp HTTP/1.1\r\nHost: t\r\n\r\n", 200, None
    data = rows(seed, draw(st.integers(1, 3)))
    headers = "Host: t\r\n"
    if kind == "json":
        head, body = infer_request(MLP, data)
        body_headers = "Content-Type: application/json\r\n"
    else:
        tensor = {"name": "input", "datatype": "FP32", "shape": list(data.shape),
                  "parameters": {"binary_data_size": data.nbytes}}  # fmt: skip
        header = json.dumps({"inputs": [tensor]})
        body = header.encode() + data.tobytes()
        body_headers = f"Inference-Header-Content-Length: {len(header)}\r\n"
    if draw(st.booleans()):
        body_headers += "Expect: 100-continue\r\n"
    if draw(st.booleans()):
        cuts = draw(st.lists(st.integers(0, 10**6), max_size=5))
        wire_body = _chunked(body, cuts, draw(st.booleans()), draw(st.booleans()))
        body_headers += "Transfer-Encoding: chunked\r\n"
    else:
        wire_body = body
        spaces = " " * draw(st.integers(0, 2))
        body_headers += f"Content-Length:{spaces} {len(body)}\r\n"
    head = f"POST /v2/models/{MLP}/infer HTTP/1.1\r\n{headers}{body_headers}\r\n".encode()
    return head + wire_body, 200, data


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[tuple[bytes, int, np.ndarray | None]], list[int]]:
    """Several requests back to back, and the byte offsets at which the client's writes end."""
    requests_ = [draw(framed_request(100 + i)) for i in range(draw(st.integers(1, 6)))]
    total = sum(len(wire) for wire, _, _ in requests_)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(total - 1, 1)), max_size=8))))
    return requests_, cuts


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(pipeline=pipelines())
def test_pipelined_requests_in_any_framing_and_any_writes_are_each_answered(
    volley: VolleyProcess, models: Path, pipeline: tuple[list, list[int]]
) -> None:
    """Infer (JSON and binary tensors), readiness and metadata requests back to back on one
    connection, bodies with Content-Length or chunked (any cuts, either hex case, extensions),
    some with Expect: 100-continue, all cut into arbitrary writes: every request gets exactly
    one answer, in order, with ONNX Runtime's scores, and the connection stays open."""
    requests_, cuts = pipeline
    wire = b"".join(w for w, _, _ in requests_)
    conn = Connection(volley)
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            conn.send(wire[start:end])
            time.sleep(0.001)
        for _, status, data in requests_:
            got, headers, body = conn.response()
            while got == 100:  # an interim answer to Expect: 100-continue
                got, headers, body = conn.response()
            assert got == status, body
            if data is not None:
                if headers.get("content-type", "").startswith("application/json"):
                    assert_close(scores(body), expected(models, data))
                else:  # binary answer: JSON header, then the raw scores
                    size = int(headers["inference-header-content-length"])
                    raw = np.frombuffer(body[size:], np.float32).reshape(len(data), -1)
                    assert_close(raw, expected(models, data))
        conn.send(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.response()[0] == 200  # still open and in step
    finally:
        conn.close()
