"""Camera streams to the `detect` pipeline: latest-frame-wins over gRPC and WebSocket.

A stream that sends faster than the server answers must see bounded latency (frames replaced
while they wait are answered as skipped, never queued without end), every frame gets exactly
one answer, a slow stream beside a fast one is not starved, and bad frames fail alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import websockets
import yaml
from conftest import VolleyProcess, copy_shipped_models, serving
from metrics_scrape import scrape, total
from tritonclient.utils import InferenceServerException
from vision_scenes import encode, scene_image
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

LATENCY_BOUND_MS = 250  # a few frame intervals plus one inference, with room for a busy CI box


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    """640x480 JPEG camera frames of synthetic scenes."""
    return [encode(scene_image(seed, (320, 240), 2.0).image, quality=85) for seed in range(8)]


@dataclass
class Answers:
    """What one stream got back, by frame id."""

    sent_at: dict[str, float] = field(default_factory=dict)
    processed: dict[str, float] = field(default_factory=dict)  # id -> latency (ms)
    skipped: dict[str, str] = field(default_factory=dict)  # id -> reason
    errors: list[str] = field(default_factory=list)  # one frame's error each
    ended: str | None = None  # the status the stream itself ended with, when not OK
    detections: int = 0

    @property
    def answered(self) -> int:
        return len(self.processed) + len(self.skipped) + len(self.errors)

    def latencies(self) -> np.ndarray:
        return np.array([self.processed[k] for k in self.sent_at if k in self.processed])


class CameraStream:
    """A tritonclient gRPC stream to `detect` that records every answer."""

    def __init__(self, address: str, prefix: str) -> None:
        self.prefix = prefix
        self.answers = Answers()
        self.client = grpcclient.InferenceServerClient(address)
        self._lock = threading.Lock()
        self.client.start_stream(callback=self._on_answer)
        self.count = 0

    def send(self, frame: bytes, frame_id: str | None = None) -> str:
        self.count += 1
        frame_id = frame_id or f"{self.prefix}{self.count}"
        tensor = grpcclient.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([frame], dtype=np.object_))
        with self._lock:
            self.answers.sent_at[frame_id] = time.perf_counter()
        self.client.async_stream_infer("detect", [tensor], request_id=frame_id,
                                       parameters={"capture_ts": frame_id})  # fmt: skip
        return frame_id

    def _on_answer(self, result, error) -> None:
        now = time.perf_counter()
        with self._lock:
            if error is not None and error.status():  # the stream ended with this status
                self.answers.ended = str(error)
                return
            if error is not None:
                self.answers.errors.append(str(error))
                return
            response = result.get_response()
            params = response.parameters
            assert params["capture_ts"].string_param == response.id
            if params["skipped"].bool_param:
                self.answers.skipped[response.id] = params["skip_reason"].string_param
                return
            self.answers.processed[response.id] = (now - self.answers.sent_at[response.id]) * 1e3
            self.answers.detections += int(result.as_numpy("num_detections")[0])

    def wait_all(self, timeout: float = 30.0) -> Answers:
        deadline = time.monotonic() + timeout
        while self.answers.answered < len(self.answers.sent_at):
            assert time.monotonic() < deadline, f"{self.prefix}: answers missing"
            time.sleep(0.02)
        return self.answers

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def send_at(stream: CameraStream, frames: list[bytes], fps: float, seconds: float) -> None:
    """Send frames at a steady rate, as a camera does."""
    start = time.perf_counter()
    n = int(fps * seconds)
    for i in range(n):
        delay = start + i / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        stream.send(frames[i % len(frames)])


def metrics(proc: VolleyProcess) -> dict:
    return scrape(f"http://127.0.0.1:{proc.metrics_port}/metrics")


def test_overloaded_stream_skips_instead_of_queueing(
    shipped: VolleyProcess, frames: list[bytes]
) -> None:
    before = metrics(shipped)
    stream = CameraStream(shipped.grpc, "f")
    send_at(stream, frames, fps=400, seconds=3)
    answers = stream.wait_all()
    stream.close()
    assert not answers.errors
    assert answers.answered == len(answers.sent_at), "every frame gets exactly one answer"
    assert len(answers.skipped) > 0.2 * len(answers.sent_at), "the server kept up with 400 FPS?"
    assert set(answers.skipped.values()) <= {"replaced by a newer frame"}
    assert len(answers.processed) >= 30 and answers.detections > 0
    latency = answers.latencies()
    assert np.percentile(latency, 99) < LATENCY_BOUND_MS, np.percentile(latency, [50, 99])
    third = len(latency) // 3
    early, late = np.median(latency[:third]), np.median(latency[-third:])
    assert late < 2 * early + 30, f"latency grew over the run: {early:.1f} -> {late:.1f} ms"
    after = metrics(shipped)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("volley_frames_total", model="detect", outcome="skipped") == len(answers.skipped)
    assert delta("volley_frames_total", model="detect", outcome="processed") == len(
        answers.processed
    )
    assert delta("volley_frame_latency_seconds_count", model="detect") == len(answers.processed)
    assert delta("volley_frame_age_seconds_count", model="detect") == len(answers.processed)
    assert total(after, "volley_active_streams", model="detect") == 0


def test_slow_stream_is_not_starved_by_a_fast_one(
    shipped: VolleyProcess, frames: list[bytes]
) -> None:
    fast, slow = CameraStream(shipped.grpc, "fast"), CameraStream(shipped.grpc, "slow")
    flood = threading.Thread(target=send_at, args=(fast, frames, 400, 3))
    flood.start()
    send_at(slow, frames, fps=8, seconds=3)
    flood.join()
    fast_answers, slow_answers = fast.wait_all(), slow.wait_all()
    fast.close()
    slow.close()
    assert len(fast_answers.skipped) > 0
    assert len(slow_answers.processed) >= 0.9 * len(slow_answers.sent_at), slow_answers.skipped
    assert np.percentile(slow_answers.latencies(), 99) < LATENCY_BOUND_MS


def test_bad_frames_fail_alone_and_the_stream_goes_on(
    shipped: VolleyProcess, frames: list[bytes]
) -> None:
    stream = CameraStream(shipped.grpc, "b")
    for frame in (frames[0], frames[1][: len(frames[1]) // 3], b"not an image", frames[2]):
        stream.send(frame)
        stream.wait_all()  # one at a time: none of them is replaced
    stream.close()
    answers = stream.answers
    assert sorted(answers.processed) == ["b1", "b4"]
    assert len(answers.errors) == 2
    assert "frame 'b2': image 0: the image data is truncated or corrupt" in answers.errors[0]
    assert "frame 'b3': image 0: not a JPEG, PNG, WebP or BMP image" in answers.errors[1]


def test_disconnect_frees_the_stream(shipped: VolleyProcess, frames: list[bytes]) -> None:
    stream = CameraStream(shipped.grpc, "d")
    for _ in range(20):
        stream.send(frames[0])
    wait_for_active_streams(shipped, 1)
    stream.client.stop_stream(cancel_requests=True)
    stream.client.close()
    wait_for_active_streams(shipped, 0)


def wait_for_active_streams(proc: VolleyProcess, count: int) -> None:
    deadline = time.monotonic() + 10
    while total(metrics(proc), "volley_active_streams", model="detect") != count:
        assert time.monotonic() < deadline, f"volley_active_streams never became {count}"
        time.sleep(0.05)


def test_frames_too_old_at_batch_time_are_skipped(tmp_path: Path, frames: list[bytes]) -> None:
    repository = copy_shipped_models(tmp_path)
    config_path = repository / "detect" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config_path.write_text(yaml.safe_dump({**config, "max_frame_age_ms": 1}))
    with serving(repository) as proc:
        stream = CameraStream(proc.grpc, "old")
        for _ in range(3):
            stream.send(frames[0])  # a 640x480 JPEG takes longer than 1 ms to decode
            stream.wait_all()
        stream.close()
        reasons = set(stream.answers.skipped.values())
        assert reasons == {"older than max_frame_age_ms (1 ms) at batch time"}
        assert len(stream.answers.skipped) == 3
        skipped = total(metrics(proc), "volley_frames_total", model="detect", outcome="skipped")
        assert skipped == 3


def test_websocket_stream_answers_every_frame(shipped: VolleyProcess, frames: list[bytes]) -> None:
    async def session() -> list[dict]:
        url = f"ws://{shipped.http}/v2/models/detect/stream"
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"id": "w1", "capture_ts": 12.5,
                                      "parameters": {"score_threshold": 0.5}}))  # fmt: skip
            await ws.send(frames[0])
            first = json.loads(await ws.recv())
            await ws.send(b"junk")
            second = json.loads(await ws.recv())
            await ws.send("[1, 2]")
            third = json.loads(await ws.recv())
            for frame in frames * 5:  # a burst: most wait and are replaced
                await ws.send(frame)
            burst = [json.loads(await ws.recv()) for _ in range(len(frames) * 5)]
            return [first, second, third, *burst]

    first, second, third, *burst = asyncio.run(session())
    assert first["id"] == "w1" and first["capture_ts"] == 12.5
    assert (first["width"], first["height"]) == (640, 480)
    assert first["detections"] and all(d["score"] >= 0.5 for d in first["detections"])
    box = first["detections"][0]["box"]
    assert 0 <= box[0] < box[2] <= 640 and 0 <= box[1] < box[3] <= 480
    assert set(first["timings"]) == {"decode_us", "queue_us", "inference_us", "nms_us", "total_us"}
    assert second == {"id": "2", "error": "frame '2': image 0: not a JPEG, PNG, WebP or BMP image"}
    assert third == {"id": None, "error": "text message must be a JSON object"}
    ids = sorted(int(answer["id"]) for answer in burst)
    assert ids == list(range(3, 3 + len(frames) * 5)), "every frame answered once"
    assert any(answer.get("skipped") for answer in burst)
    assert any("detections" in answer for answer in burst)


def test_websocket_to_a_model_that_is_not_a_pipeline_is_closed(shipped: VolleyProcess) -> None:
    async def session(model: str) -> tuple[dict, int]:
        async with websockets.connect(f"ws://{shipped.http}/v2/models/{model}/stream") as ws:
            answer = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return answer, closed.value.rcvd.code

    assert asyncio.run(session("fraud")) == (
        {"id": None, "error": "model 'fraud' is not a pipeline model; camera streams need one "
                              "(e.g. 'detect')"},
        1008,
    )  # fmt: skip
    assert asyncio.run(session("nope")) == (
        {"id": None, "error": "Request for unknown model: 'nope' is not found"},
        1008,
    )


def test_sigterm_ends_open_camera_streams_after_their_last_answer(
    tmp_path: Path, frames: list[bytes]
) -> None:
    with serving(copy_shipped_models(tmp_path)) as proc:
        stream = CameraStream(proc.grpc, "t")
        send_at(stream, frames, fps=15, seconds=1)
        before_stop = dict(stream.answers.sent_at)
        stream.wait_all()
        send_at(stream, frames, fps=15, seconds=0.3)
        started = time.monotonic()
        proc.proc.terminate()
        exit_code = proc.proc.wait(timeout=20)
        took = time.monotonic() - started
        stream.close()
    assert exit_code == 0
    assert took < 10, f"an open stream held the shutdown for {took:.1f} s"
    answered = set(stream.answers.processed) | set(stream.answers.skipped)
    assert set(before_stop) <= answered
    assert len(answered) + len(stream.answers.errors) <= len(stream.answers.sent_at)
    # the server cut the stream while the client still had it open: it says so
    assert stream.answers.ended == "[StatusCode.UNAVAILABLE] server is shutting down"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_ends_camera_streams_that_keep_sending(
    tmp_path: Path, frames: list[bytes], workers: str
) -> None:
    """Cameras never go quiet: on SIGTERM their streams are ended once the frames they took are
    answered, instead of holding the shutdown for its whole budget (30 s by default) while each
    new frame is refused. The WebSocket session closes with 1012 (service restart), the code
    that tells a client to reconnect. With two workers each drains its own streams."""
    with serving(copy_shipped_models(tmp_path), "--workers", workers) as proc:
        grpc_stream = CameraStream(proc.grpc, "g")

        def grpc_camera() -> None:
            while proc.proc.poll() is None:
                try:
                    grpc_stream.send(frames[grpc_stream.count % len(frames)])
                except InferenceServerException:  # the stream ended: its status comes below
                    return
                time.sleep(1 / 15)

        async def websocket_camera() -> tuple[int, list[dict], int | None]:
            url = f"ws://{proc.http}/v2/models/detect/stream"
            async with websockets.connect(url, max_size=None) as ws:
                answers: list[dict] = []

                async def read() -> None:
                    try:
                        async for message in ws:
                            answers.append(json.loads(message))
                    except websockets.ConnectionClosed:
                        pass

                reader = asyncio.create_task(read())
                sent = 0
                try:
                    while not reader.done():
                        await ws.send(frames[sent % len(frames)])
                        sent += 1
                        await asyncio.sleep(1 / 15)
                except websockets.ConnectionClosed:
                    pass
                await reader
                return sent, answers, ws.close_code

        websocket_result: list = []
        cameras = [
            threading.Thread(target=grpc_camera),
            threading.Thread(
                target=lambda: websocket_result.append(asyncio.run(websocket_camera()))
            ),
        ]
        for camera in cameras:
            camera.start()
        time.sleep(1.5)
        started = time.monotonic()
        proc.proc.terminate()
        exit_code = proc.proc.wait(timeout=40)
        took = time.monotonic() - started
        for camera in cameras:
            camera.join(timeout=10)
        grpc_stream.close()
    assert exit_code == 0
    assert took < 10, f"streaming cameras held the shutdown for {took:.1f} s"
    sent, answers, close_code = websocket_result[0]
    assert close_code == 1012
    ids = [answer["id"] for answer in answers]
    assert len(ids) == len(set(ids)) and {int(i) for i in ids} <= set(range(1, sent + 1))
    assert any("detections" in answer for answer in answers)
    assert {a["error"] for a in answers if "error" in a} <= {
        f"frame '{i}': server is shutting down" for i in ids
    }
    got = grpc_stream.answers
    assert got.processed and set(got.processed) | set(got.skipped) <= set(got.sent_at)
    assert all("server is shutting down" in error for error in got.errors), got.errors
    assert got.ended == "[StatusCode.UNAVAILABLE] server is shutting down"


def test_a_websocket_client_that_stopped_reading_and_left_does_not_hold_the_shutdown(
    tmp_path: Path,
) -> None:
    """A camera page that stops reading (a frozen tab) piles answers up on the server. When the
    server stops and the client then goes away, its answers can reach no one: the session must
    end at once, not hold the exit for the shutdown budget (20 s here) waiting to send them."""
    with serving(copy_shipped_models(tmp_path), "--shutdown-timeout", "20") as proc:
        sock = _websocket_that_stops_reading(proc.http)
        started = time.monotonic()
        proc.proc.terminate()
        time.sleep(1.0)  # the server is shutting down, the session still holds answers
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # gone, with a reset: nothing more can be sent to it
        exit_code = proc.proc.wait(timeout=40)
        took = time.monotonic() - started
    assert exit_code == 0
    assert took < 8, f"a client that left held the shutdown for {took:.1f} s"


def _websocket_that_stops_reading(address: str) -> socket.socket:
    """A WebSocket camera session that sends bad text messages (each gets an error answer) and
    never reads, until the server stops reading too: its answers have filled every buffer."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect((host, int(port)))
    client = ClientProtocol(parse_uri(f"ws://{address}/v2/models/detect/stream"))
    client.send_request(client.connect())
    sock.sendall(b"".join(client.data_to_send()))
    while client.state is not State.OPEN:
        client.receive_data(sock.recv(65536))
        assert client.handshake_exc is None, client.handshake_exc
    sock.settimeout(1.0)
    with contextlib.suppress(TimeoutError):
        for _ in range(1_000_000):
            client.send_text(b"not a header")
            sock.sendall(b"".join(client.data_to_send()))
        pytest.fail("the server read a million messages from a client that never reads")
    return sock
