"""Hostile HTTP/2 frame sequences against Volley's own gRPC server (`server/protocol/http2.py`).

`test_grpc_transport.py` sends random bytes, which rarely parse as frames. Here every frame is
well formed at the framing level (length, type, flags, stream id), and the payloads mix valid
pieces (a gRPC call's header block, a length-prefixed ModelInferRequest, SETTINGS entries,
window increments) with hostile ones (wrong stream ids, flags that promise padding or priority
that is not there, truncated or oversized values, unknown frame types). Whatever arrives, once
the client closes its side the server must close the connection within a few seconds, never
log a traceback, and go on serving everyone else.
"""

from __future__ import annotations

import socket
import struct

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess, serving
from http2_wire import PREFACE, frame, frames_in, literal_headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

pytestmark = pytest.mark.timeout(600)

SERVICE = "/inference.GRPCInferenceService/"
CLOSE_WITHIN_S = 10  # after the client's EOF; generous for a busy 2-core machine
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20


@pytest.fixture(scope="module")
def volley(tmp_path_factory: pytest.TempPathFactory) -> VolleyProcess:
    models = tmp_path_factory.mktemp("frames") / "models"
    onnx_models.mlp(models / "mlp" / "1" / "model.onnx", features=8, hidden=16)
    onnx_models.write_config(
        models / "mlp", {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 500}}
    )
    with serving(models, "--host", "127.0.0.1") as proc:
        yield proc


@pytest.fixture(autouse=True)
def still_serving(volley: VolleyProcess):
    """Every test ends with the server answering correctly and no traceback in its log."""
    yield
    x = np.ones((1, 8), np.float32)
    tensor = grpcclient.InferInput("input", [1, 8], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(volley.grpc) as client:
        assert client.infer("mlp", [tensor]).as_numpy("score").shape == (1, 1)
    assert "Traceback" not in volley.log()


def call_headers(method: str) -> bytes:
    return literal_headers(
        [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + method),
         (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip


def infer_message(rows: int) -> bytes:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 8])
    request.raw_input_contents.append(np.ones((rows, 8), np.float32).tobytes())
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def padded(payload: bytes, pad: int) -> bytes:
    return bytes((pad,)) + payload + bytes(pad)


@st.composite
def unary_call(draw: st.DrawFn, stream: int) -> tuple[bytes, int]:
    """A whole ModelInfer call on `stream`, framed in one of the ways HTTP/2 allows: the header
    block whole or split over CONTINUATION frames, with or without padding and priority, the
    message in one DATA frame or several, END_STREAM on the last DATA or on an empty one."""
    block = call_headers("ModelInfer")
    cut = draw(st.integers(0, len(block)))
    head, rest = block[:cut] or block, block[cut:] if cut else b""
    flags, payload = 0, head
    if draw(st.booleans()):
        flags |= PRIORITY_FLAG
        payload = struct.pack(">IB", draw(st.sampled_from([0, 1, stream])), 15) + payload
    if draw(st.booleans()):
        flags |= PADDED
        payload = padded(payload, draw(st.integers(0, 20)))
    out = frame(HEADERS, flags | (0 if rest else END_HEADERS), stream, payload)
    if rest:
        out += frame(CONTINUATION, END_HEADERS, stream, rest)
    message = infer_message(draw(st.integers(1, 4)))
    pieces = draw(st.integers(1, 4))
    size = -(-len(message) // pieces)
    chunks = [message[i : i + size] for i in range(0, len(message), size)]
    empty_end = draw(st.booleans())
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1 and not empty_end
        if draw(st.booleans()):
            out += frame(DATA, PADDED | (END_STREAM if last else 0), stream,
                         padded(chunk, draw(st.integers(0, 8))))  # fmt: skip
        else:
            out += frame(DATA, END_STREAM if last else 0, stream, chunk)
    if empty_end:
        out += frame(DATA, END_STREAM, stream, b"")
    return out, stream


def control_frames(open_streams: list[int]) -> st.SearchStrategy[bytes]:
    """Frames a well-behaved peer may send at any time."""
    any_stream = st.sampled_from([0, *open_streams]) if open_streams else st.just(0)
    return st.one_of(
        st.binary(min_size=8, max_size=8).map(lambda opaque: frame(PING, 0, 0, opaque)),
        st.lists(
            st.sampled_from(
                [
                    (1, 4096),
                    (2, 0),
                    (3, 100),
                    (4, 65535),
                    (4, 1),
                    (5, 16384),
                    (5, 2**20),
                    (6, 8192),
                    (9, 1),
                ]
            ),  # fmt: skip
            max_size=3,
        ).map(
            lambda entries: frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", *e) for e in entries))
        ),
        st.builds(
            lambda stream, n: frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", n)),
            any_stream,
            st.sampled_from([1, 100, 65535, 2**20]),
        ),  # fmt: skip
        st.builds(
            lambda stream: frame(PRIORITY, 0, stream or 1, struct.pack(">IB", 0, 7)), any_stream
        ),
    )


hostile_frames = st.one_of(
    st.builds(
        frame,
        st.sampled_from([HEADERS, CONTINUATION, DATA, PUSH_PROMISE]),
        st.integers(0, 255),
        st.sampled_from([0, 1, 2, 3, 2**31 - 1]),
        st.binary(max_size=40),
    ),  # fmt: skip
    st.builds(
        frame,
        st.sampled_from([SETTINGS, WINDOW_UPDATE, RST_STREAM, PING, PRIORITY, GOAWAY]),
        st.integers(0, 255),
        st.sampled_from([0, 1, 3]),
        st.binary(max_size=14),
    ),  # fmt: skip
    st.builds(
        lambda stream, n: frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", n)),
        st.sampled_from([0, 1]),
        st.sampled_from([0, 2**31 - 1, 2**32 - 1]),
    ),  # fmt: skip
    st.builds(
        frame,
        st.integers(10, 255),
        st.integers(0, 255),
        st.sampled_from([0, 1]),
        st.binary(max_size=12),
    ),  # fmt: skip
)


@st.composite
def conversations(draw: st.DrawFn, hostile: bool) -> tuple[bytes, set[int]]:
    """Frames of several calls interleaved with control frames, resets and (if `hostile`) one
    frame a well-behaved peer would not send; and the streams whose calls were sent whole and
    not reset (each must get its answer when nothing hostile was sent)."""
    out, answered, next_stream = b"", set(), 1
    for _ in range(draw(st.integers(1, 6))):
        step = draw(st.sampled_from(["call", "call", "control", "reset", "half"]))
        if step == "call":
            wire, stream = draw(unary_call(next_stream))
            out += wire
            answered.add(stream)
            next_stream += 2
        elif step == "half":  # a call whose message never ends (the client's EOF ends it)
            out += frame(HEADERS, END_HEADERS, next_stream, call_headers("ModelInfer"))
            out += frame(DATA, 0, next_stream, infer_message(1)[:7])
            next_stream += 2
        elif step == "reset" and answered:
            stream = draw(st.sampled_from(sorted(answered)))
            out += frame(RST_STREAM, 0, stream, struct.pack(">I", 8))  # CANCEL
            answered.discard(stream)
        else:
            out += draw(control_frames(sorted(answered)))
    if hostile:
        at = draw(st.integers(0, len(out)))  # anywhere: between frames or inside one
        out = out[:at] + draw(hostile_frames) + out[at:]
        answered = set()
    return out, answered


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(conversation=conversations(hostile=False))
def test_every_call_sent_whole_is_answered_however_it_is_framed(
    volley: VolleyProcess, conversation: tuple[bytes, set[int]]
) -> None:
    """Calls split over CONTINUATION and DATA frames, padded, with priorities, interleaved with
    PING, SETTINGS, WINDOW_UPDATE, PRIORITY, resets and a call left half-sent: each call sent
    whole and not reset gets grpc-status 0, and the server closes after the client's EOF (which
    abandons the half-sent call)."""
    wire, expected = conversation
    received = converse(volley, wire, until_answered=expected)
    assert answered_streams(received) >= expected


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(conversation=conversations(hostile=True))
def test_a_hostile_frame_anywhere_never_breaks_the_server(
    volley: VolleyProcess, conversation: tuple[bytes, set[int]]
) -> None:
    """The same conversations with one hostile frame (or stray bytes) put anywhere, even inside
    another frame: the server answers, resets streams or closes the connection, closes after
    the client's EOF, logs no traceback, and goes on serving others."""
    converse(volley, conversation[0])


def converse(volley: VolleyProcess, wire: bytes, until_answered: set[int] | None = None) -> bytes:
    """Send the preface, SETTINGS and `wire`; read until the streams `until_answered` have
    their answers (if given), returning the flow-control credit of every DATA frame read as a
    client does; then close our side and read until the server closes, failing if it does not
    within `CLOSE_WITHIN_S`."""
    host, port = volley.grpc.rsplit(":", 1)
    received, credited = b"", 0
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(CLOSE_WITHIN_S)
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b"") + wire)
        try:
            while until_answered and not answered_streams(received) >= until_answered:
                chunk = sock.recv(65536)
                if not chunk:
                    return received
                received += chunk
                credit, credited = window_updates(received, credited)
                sock.sendall(credit)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # a reset is a close
        except TimeoutError:
            pytest.fail(f"no answer or no close within {CLOSE_WITHIN_S} s: {received[-300:]!r}")
    return received


def window_updates(received: bytes, start: int) -> tuple[bytes, int]:
    """WINDOW_UPDATE frames giving back what the whole DATA frames from offset `start` took, and
    the offset after the last whole frame."""
    out, at = b"", start
    for kind, stream, payload, end in frames_in(received, start):
        if kind == DATA and payload:
            increment = struct.pack(">I", len(payload))
            out += frame(WINDOW_UPDATE, 0, stream, increment)
            out += frame(WINDOW_UPDATE, 0, 0, increment)
        at = end
    return out, at


def answered_streams(received: bytes) -> set[int]:
    """Streams on which the server sent trailers with grpc-status 0."""
    return {
        stream
        for kind, stream, payload, _ in frames_in(received)
        if kind == HEADERS and b"grpc-status\x010" in payload
    }
