"""`volley camera SOURCE`: a live detection client over gRPC ModelStreamInfer.

Frames come from cv2.VideoCapture (webcam index, video file or RTSP/HTTP URL), go to the server
as JPEG, one stream request per frame (the server keeps only the newest waiting frame and answers
replaced ones as skipped). Answers arrive on tritonclient's stream thread and are handed to the
main thread through a queue; the main thread draws the newest detections with FPS and end-to-end
latency on every frame, in a window or (headless) into a video file, and logs every answer.
When the stream breaks or the server is unreachable, frames keep flowing (unsent) while the
client reconnects with exponential backoff.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import cv2
import numpy as np

from clients.draw import draw_detections, draw_status
from clients.vision import (
    Detection,
    VisionError,
    detect_parameters,
    images_input,
    one_line,
    parse_detections,
    requested_outputs,
    response_id,
    response_parameters,
)

BACKOFF_START = 0.5  # seconds before the first reconnect attempt
BACKOFF_MAX = 5.0
CONNECT_TIMEOUT = 2.0  # seconds for the readiness check of a connection attempt
DRAIN_SECONDS = 3.0  # end of a video file: wait this long at most for outstanding answers
STALL_SECONDS = 10.0  # frames outstanding and no answer for this long: the stream is dead
ERROR_STREAK = 5  # this many frame errors in a row: reconnect (e.g. the server is draining)
LIVE_READ_GIVE_UP = 30.0  # a URL source that yields no frame for this long ends the session
WINDOW = "volley camera"
_FRAME_ERROR = re.compile(r"frame '([^']*)'")

SourceKind = Literal["webcam", "file", "url"]


class CameraError(Exception):
    """A setup failure reported as one line (exit code 1)."""


@dataclass
class Source:
    """An opened capture and what kind of source it is."""

    capture: cv2.VideoCapture
    kind: SourceKind
    fps: float | None
    spec: str

    def reopen(self) -> bool:
        self.capture.release()
        self.capture = _video_capture(self.spec, self.kind)
        return self.capture.isOpened()


def _video_capture(spec: str, kind: SourceKind) -> cv2.VideoCapture:
    return cv2.VideoCapture(int(spec) if kind == "webcam" else spec)


def open_source(spec: str) -> Source:
    """Webcam index ("0"), URL (rtsp://, http://, ...) or video file path."""
    if spec.isdigit():
        kind: SourceKind = "webcam"
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec):
        kind = "url"
    else:
        kind = "file"
        if "%" not in spec and not Path(spec).is_file():  # "%" : an image-sequence pattern
            raise CameraError(f"{spec}: no such video file")
    capture = _video_capture(spec, kind)
    if not capture.isOpened():
        capture.release()
        what = {"webcam": "webcam", "url": "stream", "file": "video file"}[kind]
        raise CameraError(f"{spec}: cannot open the {what} with OpenCV")
    fps = capture.get(cv2.CAP_PROP_FPS)
    return Source(capture, kind, fps if math.isfinite(fps) and 0 < fps <= 1000 else None, spec)


def check_window_support() -> None:
    """Raise CameraError unless cv2.imshow works (headless OpenCV builds raise)."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise CameraError("no display to open a window on (DISPLAY is unset); use --headless")
    try:
        cv2.imshow(WINDOW, np.zeros((16, 16, 3), np.uint8))
        cv2.waitKey(1)
    except cv2.error:
        raise CameraError(
            "this OpenCV build has no window support (opencv-python-headless); "
            "use --headless, or install opencv-python"
        ) from None


def video_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """MJPG for .avi (and anything else), mp4v for .mp4/.m4v/.mov."""
    codec = "mp4v" if path.suffix.lower() in {".mp4", ".m4v", ".mov"} else "MJPG"
    with contextlib.suppress(OSError):  # a failure shows as a writer that is not opened
        path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, size)
    if not writer.isOpened():
        raise CameraError(f"{path}: cannot write a {codec} video there")
    return writer


@dataclass
class Answer:
    """One stream callback, as handed from tritonclient's thread to the main thread."""

    received: float  # time.time()
    result: Any | None
    error: Exception | None


@dataclass
class Counts:
    """What happened to the frames of one session."""

    frames: int = 0
    sent: int = 0
    offline: int = 0  # read while no stream was open: shown but not sent
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    unanswered: int = 0  # sent on a stream that broke, or still pending at the end
    reconnects: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self, seconds: float) -> str:
        parts = [
            f"frames={self.frames}",
            f"sent={self.sent}",
            f"offline={self.offline}",
            f"processed={self.processed}",
            f"skipped={self.skipped}",
            f"errors={self.errors}",
            f"unanswered={self.unanswered}",
            f"reconnects={self.reconnects}",
        ]
        if self.latencies_ms:
            p50, p95 = np.percentile(self.latencies_ms, [50, 95])
            parts += [f"latency_p50_ms={p50:.0f}", f"latency_p95_ms={p95:.0f}"]
        parts.append(f"seconds={seconds:.1f}")
        return "summary: " + " ".join(parts)


def _stream_alive(client: Any) -> bool:
    """False once tritonclient's response thread has ended (the server closed the stream)."""
    stream = getattr(client, "_stream", None)
    handler = getattr(stream, "_handler", None)
    return handler is None or handler.is_alive()


class StreamSession:
    """A gRPC ModelStreamInfer session to `model` that reconnects with exponential backoff.

    Callbacks run on tritonclient's thread and only put `Answer`s on `answers`; everything else
    runs on the caller's thread.
    """

    def __init__(self, server: str, model: str, answers: queue.Queue[Answer]) -> None:
        self.server, self.model, self.answers = server, model, answers
        self.client: Any = None
        self.generation = 0
        self.backoff = BACKOFF_START
        self.next_attempt = 0.0  # time.monotonic() of the next connection attempt
        self.ever_connected = False
        self.reconnects = 0
        self._broken: str | None = None  # set by the callback thread
        self.last_problem = ""

    @property
    def connected(self) -> bool:
        return self.client is not None

    def _on_answer(self, generation: int, result: Any, error: Exception | None) -> None:
        """tritonclient's stream callback: hand over, and note a broken stream."""
        if error is not None and result is None and _stream_level(error):
            if generation == self.generation and self.client is not None:
                self._broken = one_line(error)
            return
        self.answers.put(Answer(time.time(), result, error))

    def ensure(self) -> bool:
        """True when a stream is open; otherwise try to open one if its backoff has passed."""
        if self.client is not None:
            if self._broken is None and not _stream_alive(self.client):
                self._broken = "the server closed the stream"
            if self._broken is None:
                return True
            self.disconnect(f"stream lost: {self._broken}")
        if time.monotonic() < self.next_attempt:
            return False
        return self._connect()

    def _connect(self) -> bool:
        import tritonclient.grpc as grpcclient

        client = None
        problem = None
        try:
            client = grpcclient.InferenceServerClient(self.server)
            if client.is_model_ready(self.model, client_timeout=CONNECT_TIMEOUT):
                self.generation += 1
                self._broken = None
                client.start_stream(callback=partial(self._on_answer, self.generation))
            else:
                problem = f"model '{self.model}' is not ready on {self.server}"
        except Exception as exc:
            problem = f"cannot reach {self.server}: {_reason(exc)}"
        if problem is not None:
            if client is not None:
                _close_quietly(client)
            self._schedule(problem)
            return False
        self.client = client
        if self.ever_connected:
            self.reconnects += 1
        self.ever_connected = True
        print(f"connected to {self.server} (model {self.model})", file=sys.stderr, flush=True)
        return True

    def _schedule(self, why: str) -> None:
        self.last_problem = why
        print(f"{why}; retrying in {self.backoff:g} s", file=sys.stderr, flush=True)
        self.next_attempt = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def answered(self) -> None:
        """A frame was processed: the connection works, so the next outage starts over."""
        self.backoff = BACKOFF_START

    def disconnect(self, why: str | None = None) -> None:
        """Cancel the stream and drop the client; schedule a reconnect when `why` is given."""
        client, self.client = self.client, None
        self._broken = None
        self.generation += 1  # late stream errors of the old stream are not news
        if client is not None:
            _close_quietly(client)
        if why is not None:
            self._schedule(why)

    def send(self, frame_id: str, jpeg: bytes, params: dict[str, Any]) -> bool:
        """Queue one frame on the stream; False (stream marked broken) when that fails."""
        if self.client is None:
            return False
        try:
            self.client.async_stream_infer(
                self.model,
                [images_input([jpeg], "grpc")],
                outputs=requested_outputs("grpc"),
                request_id=frame_id,
                parameters=params,
            )
        except Exception as exc:
            self._broken = _reason(exc)
            return False
        return True


def _stream_level(error: Exception) -> bool:
    """A gRPC status error ends the stream; per-frame errors come without a status."""
    status = getattr(error, "status", None)
    return bool(status()) if callable(status) else False


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return one_line(text or type(exc).__name__)


def _close_quietly(client: Any) -> None:
    # A cancelled tritonclient stream leaves gRPC's request thread waiting on its queue; the
    # end-of-requests marker lets that thread finish too.
    requests = getattr(getattr(client, "_stream", None), "_request_queue", None)
    with contextlib.suppress(Exception):
        client.stop_stream(cancel_requests=True)
    if requests is not None:
        requests.put(None)
    with contextlib.suppress(Exception):
        client.close()


class StopFlag:
    """Set by SIGINT/SIGTERM; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()


class Camera:
    """One `volley camera` session."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.answers: queue.Queue[Answer] = queue.Queue()
        self.session = StreamSession(args.server, args.model, self.answers)
        self.counts = Counts()
        self.stop = StopFlag()
        self.params = detect_parameters(score_threshold=args.score_threshold)
        self.pending: dict[str, tuple[float, int]] = {}  # frame id -> (capture ms, generation)
        self.latest: list[Detection] = []
        self.latest_latency: float | None = None
        self.answer_times: deque[float] = deque()
        self.last_answer = time.monotonic()
        self.error_streak = 0  # frame errors in a row, e.g. from a server shutting down
        self.last_error = ""
        self.source: Source
        self.writer: cv2.VideoWriter | None = None
        self.log: IO[str] | None = None
        self.out_path: Path | None = args.out
        self.log_path: Path | None = args.log
        if args.headless:
            self.out_path = self.out_path or Path("annotated.avi")
            self.log_path = self.log_path or Path("frames.jsonl")

    # answers -----------------------------------------------------------------------------
    def _write_log(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def handle_answers(self, timeout: float = 0.0) -> None:
        """Take every answer waiting (waiting up to `timeout` for the first)."""
        try:
            answer = self.answers.get(timeout=timeout) if timeout > 0 else self.answers.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(answer)
            try:
                answer = self.answers.get_nowait()
            except queue.Empty:
                return

    def _handle(self, answer: Answer) -> None:
        self.last_answer = time.monotonic()
        record: dict[str, Any] = {
            "id": None,
            "status": "error",
            "latency_ms": None,
            "detections": [],
            "error": None,
        }
        if answer.result is None:  # a frame the server could not use: the stream goes on
            message = _reason(answer.error) if answer.error else "no result"
            match = _FRAME_ERROR.search(message)
            record["id"] = match.group(1) if match else None
            record["error"] = message
            self.counts.errors += 1
            self.error_streak += 1
            self.last_error = message
        else:
            record["id"] = response_id(answer.result)
            params = response_parameters(answer.result)
            if params.get("skipped"):
                record["status"] = "skipped"
                record["reason"] = params.get("skip_reason")
                self.counts.skipped += 1
            else:
                try:
                    detections = parse_detections(answer.result)[0]
                except (VisionError, IndexError, ValueError) as exc:
                    record["error"] = f"unreadable answer: {exc}"
                    self.counts.errors += 1
                else:
                    record["status"] = "processed"
                    record["detections"] = [d.to_json() for d in detections]
                    self.counts.processed += 1
                    self.latest = detections
                    self.answer_times.append(time.monotonic())
                    self.session.answered()
            self.error_streak = 0
            if "total_us" in params:
                record["server_us"] = params["total_us"]
        sent = self.pending.pop(record["id"], None) if record["id"] is not None else None
        if sent is not None:
            latency = answer.received * 1000.0 - sent[0]
            record["latency_ms"] = round(latency, 2)
            if record["status"] == "processed":
                self.counts.latencies_ms.append(latency)
                self.latest_latency = latency
        self._write_log(record)

    def _forget_stream(self, generation: int) -> None:
        """Frames sent on a stream that broke will never be answered."""
        lost = [fid for fid, (_, gen) in self.pending.items() if gen <= generation]
        for fid in lost:
            del self.pending[fid]
        self.counts.unanswered += len(lost)

    def _fps(self) -> float | None:
        now = time.monotonic()
        while self.answer_times and now - self.answer_times[0] > 2.0:
            self.answer_times.popleft()
        if len(self.answer_times) < 2:
            return 0.0 if not self.answer_times else None
        span = now - self.answer_times[0]
        return len(self.answer_times) / span if span > 0 else None

    # frames ------------------------------------------------------------------------------
    def _connected(self) -> bool:
        """Keep the stream up: notice a dead one, reconnect after its backoff."""
        session = self.session
        before = session.generation
        if (
            session.connected
            and self.pending
            and time.monotonic() - self.last_answer > STALL_SECONDS
            and min(t for t, _ in self.pending.values()) < time.time() * 1000 - STALL_SECONDS * 1e3
        ):
            session.disconnect(f"no answer for {STALL_SECONDS:g} s")
        elif session.connected and self.error_streak >= ERROR_STREAK:
            why = f"the server rejected {self.error_streak} frames in a row ({self.last_error})"
            session.disconnect(why)
        ok = session.ensure()
        if session.generation != before:  # the old stream is gone with its pending frames
            self._forget_stream(before)
            self.last_answer = time.monotonic()
            self.error_streak = 0
            self.latest, self.latest_latency = [], None
        return ok

    def _send(self, frame: np.ndarray, frame_id: str, capture_ms: float) -> None:
        if not self._connected():
            self.counts.offline += 1
            return
        ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.args.jpeg_quality])
        if not ok:
            self.counts.errors += 1
            return
        params = {**self.params, "capture_ts": capture_ms}
        if self.session.send(frame_id, jpeg.tobytes(), params):
            if not self.pending:
                self.last_answer = time.monotonic()  # the stall clock starts with this frame
            self.pending[frame_id] = (capture_ms, self.session.generation)
            self.counts.sent += 1
        else:
            self.counts.offline += 1

    def _show(self, frame: np.ndarray) -> None:
        image = draw_detections(frame, self.latest)
        extra = None if self.session.connected else "offline, reconnecting"
        draw_status(image, self._fps(), self.latest_latency, extra)
        if self.out_path is not None:
            if self.writer is None:
                size = (frame.shape[1], frame.shape[0])
                self.writer = video_writer(self.out_path, self._video_fps(), size)
            self.writer.write(image)
        if not self.args.headless:
            cv2.imshow(WINDOW, image)
            key = cv2.waitKey(1) & 0xFF
            closed = cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1
            if key in (ord("q"), 27) or closed:
                self.stop.event.set()

    def _video_fps(self) -> float:
        """Frames per second of the written video: the rate frames are read at."""
        if self.source.kind == "file" and self.args.max_fps:
            return self.args.max_fps
        return self.source.fps or 30.0

    def _read(self) -> np.ndarray | None:
        """The next frame; None at the end of a file or when a live source gives up."""
        ok, frame = self.source.capture.read()
        if ok:
            return frame
        if self.source.kind == "file":
            return None
        deadline = time.monotonic() + (LIVE_READ_GIVE_UP if self.source.kind == "url" else 2.0)
        delay = BACKOFF_START
        while not self.stop and time.monotonic() < deadline:
            print(f"{self.source.spec}: no frame; retrying in {delay:g} s", file=sys.stderr)
            self._wait(delay)
            if self.source.kind == "url":
                self.source.reopen()
            ok, frame = self.source.capture.read()
            if ok:
                return frame
            delay = min(delay * 2, BACKOFF_MAX)
        print(f"{self.source.spec}: no more frames", file=sys.stderr)
        return None

    def _wait(self, seconds: float) -> None:
        """Sleep while handling answers."""
        deadline = time.monotonic() + seconds
        while not self.stop and (left := deadline - time.monotonic()) > 0:
            self.handle_answers(timeout=min(left, 0.05))

    def run(self) -> int:
        if not self.args.headless:
            check_window_support()
        if not 1 <= self.args.jpeg_quality <= 100:
            raise CameraError("--jpeg-quality must be between 1 and 100")
        if self.args.max_fps is not None and self.args.max_fps <= 0:
            raise CameraError("--max-fps must be positive")
        threshold = self.args.score_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise CameraError("--score-threshold must be between 0 and 1")
        self.source = open_source(self.args.source)
        started = time.monotonic()
        self.stop.install()
        try:
            if self.log_path is not None:
                try:
                    self.log_path.parent.mkdir(parents=True, exist_ok=True)
                    self.log = self.log_path.open("w", encoding="utf-8")
                except OSError as exc:
                    raise CameraError(f"{self.log_path}: cannot write the log: {exc}") from None
            self._loop()
            if not self.stop:  # the source ended: give the last frames a moment
                deadline = time.monotonic() + DRAIN_SECONDS
                while self.pending and not self.stop and time.monotonic() < deadline:
                    if not self._connected():
                        break
                    self.handle_answers(timeout=0.05)
        finally:
            self.session.disconnect()
            self.handle_answers()  # what arrived before the stream was cancelled
            self.counts.unanswered += len(self.pending)
            self.counts.reconnects = self.session.reconnects
            self.stop.restore()
            self.source.capture.release()
            if self.writer is not None:
                self.writer.release()
            if self.log is not None:
                self.log.close()
            if not self.args.headless:
                with contextlib.suppress(cv2.error):
                    cv2.destroyAllWindows()
        print(self.counts.summary(time.monotonic() - started), flush=True)
        if not self.session.ever_connected:
            why = self.session.last_problem or f"cannot reach {self.args.server}"
            print(f"error: no stream to the server was ever opened: {why}", file=sys.stderr)
            return 1
        return 0

    def _loop(self) -> None:
        file_pace = self.source.kind == "file"
        rate = self.args.max_fps or (self.source.fps if file_pace else None)
        interval = 1.0 / rate if rate else 0.0
        next_due = time.monotonic()
        last_sent = -math.inf
        self._connected()  # first connection attempt before the first frame
        while not self.stop:
            if file_pace and interval:
                self._wait(next_due - time.monotonic())
                if self.stop:
                    break
                # at most one frame of debt: a slow moment does not cause a burst after it
                next_due = max(next_due + interval, time.monotonic() - interval)
            frame = self._read()
            if frame is None:
                break
            capture_ms = time.time() * 1000.0
            self.counts.frames += 1
            now = time.monotonic()
            if file_pace or now - last_sent >= interval:
                last_sent = now
                self._send(frame, str(self.counts.frames), capture_ms)
            self.handle_answers()
            self._show(frame)


def run(args: argparse.Namespace) -> int:
    """Run `volley camera` with parsed arguments; 0 on a clean end (incl. one Ctrl-C), else 1."""
    try:
        return Camera(args).run()
    except CameraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        print("interrupted", file=sys.stderr)
        return 130
