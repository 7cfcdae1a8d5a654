"""Requests leave no reference cycles behind in the server.

The server turns the cycle collector's automatic passes nearly off (`tune_garbage_collector`)
on the promise that requests free what they allocate by reference counting. A request path that
forms a cycle breaks that promise quietly: its objects pile up until one pass walks them all,
and under overload that pass stalled the event loop for 120-150 ms (gRPC refusals then took
p99 110 ms instead of 4 ms; `bench/RESULTS.md`, "Refusals without reference cycles").

The server runs unchanged; a `sitecustomize` on its PYTHONPATH adds a SIGUSR1 handler that runs
the collector with DEBUG_SAVEALL and writes what it found that belongs to Volley (objects of
`server.*` types and frames of its code) to a file. After a first pass clears what start-up left,
each kind of request is sent many times, then a second pass must find nothing of Volley's.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import websockets
from conftest import VolleyProcess, copy_shipped_models, serving
from tritonclient.utils import InferenceServerException
from vision_scenes import encode, scene_image

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
ROUNDS = 150  # of each kind of request: enough that a cycle per request is plain to see

PROBE = """
import collections, gc, json, os, signal

SERVER = os.path.join({root!r}, "server") + os.sep


def _report(signum, frame):
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = collections.Counter()
    for obj in gc.garbage:
        kind = type(obj)
        if kind.__module__.split(".")[0] == "server":
            found[kind.__module__ + "." + kind.__qualname__] += 1
        elif kind.__name__ == "frame" and obj.f_code.co_filename.startswith(SERVER):
            found["frame of " + obj.f_code.co_name] += 1
    gc.garbage.clear()
    gc.set_debug(0)
    with open({report!r} + ".tmp", "w") as out:
        json.dump(found, out)
    os.replace({report!r} + ".tmp", {report!r})


signal.signal(signal.SIGUSR1, _report)
"""


class Probe:
    """Asks the server for a collector pass and reads what it found."""

    def __init__(self, proc: VolleyProcess, report: Path) -> None:
        self.proc, self.report = proc, report

    def garbage(self) -> dict[str, int]:
        self.report.unlink(missing_ok=True)
        self.proc.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + TIMEOUT
        while not self.report.exists():
            assert time.monotonic() < deadline, "the server wrote no garbage report"
            time.sleep(0.05)
        return json.loads(self.report.read_text())


@pytest.fixture(scope="module")
def probed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[VolleyProcess, Probe]]:
    folder = tmp_path_factory.mktemp("garbage")
    site = folder / "site"
    site.mkdir()
    report = folder / "garbage.json"
    (site / "sitecustomize.py").write_text(PROBE.format(root=str(ROOT), report=str(report)))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", path)  # read by the server process as it starts
        with serving(copy_shipped_models(folder)) as proc:
            probe = Probe(proc, report)
            probe.garbage()  # what start-up and loading left
            yield proc, probe


def features(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(rows).normal(size=(rows, 17)).astype(np.float32)


def grpc_input(name: str, x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def http_input(name: str, x: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def expect_error(call) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    raise AssertionError("the request succeeded")


def test_grpc_unary_requests_leave_no_cycles(probed) -> None:
    """Answers, invalid requests and unknown models over gRPC unary calls."""
    proc, probe = probed
    x = features()
    with grpcclient.InferenceServerClient(proc.grpc) as client:
        for _ in range(ROUNDS):
            assert client.infer("fraud", [grpc_input("features", x)]).as_numpy("score").shape
            bad = grpc_input("nope", x)
            assert expect_error(lambda b=bad: client.infer("fraud", [b])) == (
                "StatusCode.INVALID_ARGUMENT"
            )
            gone = grpc_input("features", x)
            assert expect_error(lambda g=gone: client.infer("missing", [g])) == (
                "StatusCode.NOT_FOUND"
            )
    assert probe.garbage() == {}


def test_grpc_stream_requests_leave_no_cycles(probed) -> None:
    """A ModelStreamInfer stream with answers and failed requests, opened and closed often."""
    proc, probe = probed
    x = features()
    answers: queue.Queue = queue.Queue()  # each stream's answers are all taken before the next
    with grpcclient.InferenceServerClient(proc.grpc) as client:
        for _ in range(ROUNDS // 15):
            client.start_stream(callback=lambda result, error: answers.put(error))
            for i in range(15):
                name = "features" if i % 3 else "nope"
                client.async_stream_infer("fraud", [grpc_input(name, x)], request_id=str(i))
            errors = [answers.get(timeout=TIMEOUT) for _ in range(15)]
            client.stop_stream()
            assert sum(e is not None for e in errors) == 5, errors
    assert probe.garbage() == {}


def test_http_requests_leave_no_cycles(probed) -> None:
    """JSON and binary answers, invalid bodies and unknown models over HTTP."""
    proc, probe = probed
    x = features()
    with httpclient.InferenceServerClient(proc.http) as client:
        for i in range(ROUNDS):
            binary = bool(i % 2)
            result = client.infer("fraud", [http_input("features", x, binary)])
            assert result.as_numpy("score").shape == (1, 1)
            bad = http_input("nope", x, binary)
            assert expect_error(lambda b=bad: client.infer("fraud", [b])) == "400"
            gone = http_input("features", x, binary)
            assert expect_error(lambda g=gone: client.infer("missing", [g])) == "404"
    session = requests.Session()
    for _ in range(ROUNDS):
        answer = session.post(f"{proc.url}/v2/models/fraud/infer", data=b"{not json", timeout=60)
        assert answer.status_code == 400
        assert session.get(f"{proc.url}/v2/models/fraud", timeout=TIMEOUT).status_code == 200
    assert probe.garbage() == {}


def test_images_and_camera_streams_leave_no_cycles(probed) -> None:
    """Images to the detect pipeline over HTTP (good and broken) and camera frames on gRPC
    streams, which latest-frame-wins may skip."""
    proc, probe = probed
    jpeg = encode(scene_image(3, (320, 240), 2.0).image, quality=85)
    header = json.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": 4 + len(jpeg)}}]}
    ).encode()  # fmt: skip
    session = requests.Session()
    url = f"{proc.url}/v2/models/detect/infer"
    for image, status in ((jpeg, 200), (b"not an image at all", 400)):
        body = header.replace(str(4 + len(jpeg)).encode(), str(4 + len(image)).encode())
        body += struct.pack("<I", len(image)) + image
        for _ in range(20):
            answer = session.post(
                url, data=body, timeout=TIMEOUT,
                headers={"Inference-Header-Content-Length": str(len(body) - 4 - len(image))},
            )  # fmt: skip
            assert answer.status_code == status, answer.text
    frame = np.array([jpeg], dtype=np.object_)
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(proc.grpc) as client:
        for _ in range(3):
            client.start_stream(callback=lambda result, error: answers.put(error))
            for i in range(20):
                tensor = grpcclient.InferInput("images", [1], "BYTES")
                tensor.set_data_from_numpy(frame)
                client.async_stream_infer("detect", [tensor], request_id=str(i))
            errors = [answers.get(timeout=TIMEOUT) for _ in range(20)]
            client.stop_stream()
            assert all(e is None for e in errors), errors
    assert probe.garbage() == {}


def test_websocket_cameras_and_scrapes_leave_no_cycles(probed) -> None:
    """Camera sessions over the WebSocket (frames, a broken frame, bursts that are skipped),
    closed and reopened, and Prometheus scrapes of the HTTP port."""
    proc, probe = probed
    jpeg = encode(scene_image(5, (320, 240), 2.0).image, quality=85)

    async def session() -> int:
        url = f"ws://{proc.http}/v2/models/detect/stream"
        async with websockets.connect(url, max_size=None) as ws:
            answers = []
            for frame in (jpeg, b"junk"):
                await ws.send(frame)
                answers.append(json.loads(await ws.recv()))
            for _ in range(8):  # a burst: most wait and are replaced
                await ws.send(jpeg)
            answers += [json.loads(await ws.recv()) for _ in range(8)]
        return sum("error" in answer for answer in answers)

    for _ in range(5):
        assert asyncio.run(session()) == 1
    for _ in range(20):
        assert requests.get(f"{proc.url}/metrics", timeout=TIMEOUT).status_code == 200
    assert probe.garbage() == {}


def test_refusals_of_a_full_pipeline_leave_no_cycles(probed) -> None:
    """Bursts of images to `detect` past its queue bound: the refused ones (429 and
    RESOURCE_EXHAUSTED) are the requests an overloaded server answers most."""
    proc, probe = probed
    jpeg = encode(scene_image(7, (320, 240), 2.0).image, quality=85)
    outcomes: list[str] = []

    def done(result, error) -> None:
        outcomes.append("ok" if error is None else str(error.status()))

    with grpcclient.InferenceServerClient(proc.grpc) as client:
        tensor = grpcclient.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
        for burst in range(1, 4):
            for _ in range(150):  # the shipped `detect` takes 64 requests in progress
                client.async_infer("detect", [tensor], callback=done)
            deadline = time.monotonic() + TIMEOUT
            while len(outcomes) < 150 * burst and time.monotonic() < deadline:
                time.sleep(0.01)
    assert len(outcomes) == 450
    assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes and "ok" in outcomes, set(outcomes)
    assert probe.garbage() == {}
