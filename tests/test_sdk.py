"""The Python SDK (`clients.VolleyClient`, `clients.AsyncVolleyClient`) against a real server on a
copy of the shipped repository, over gRPC and HTTP; and its example scripts, run as a user would."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, VolleyProcess, copy_shipped_models, free_port, serving
from reference import assert_close, ort_outputs
from vision_scenes import SceneImage, encode, matched_fraction, scene_image

from clients import (
    AsyncVolleyClient,
    Detection,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    Unavailable,
    VolleyClient,
    VolleyError,
)
from clients.core import Endpoint
from clients.errors import DeadlineExceeded, error

FRAUD_ONNX = ROOT / "models" / "fraud" / "1" / "model.onnx"
FRAUD_PARAMS = yaml.safe_load((ROOT / "models" / "fraud" / "config.yaml").read_text())["parameters"]
FEATURES = FRAUD_PARAMS["feature_names"].split(",")  # the raw columns, in graph order
MATCHED_FLOOR = 0.7


@pytest.fixture(params=["grpc", "http"])
def url(request: pytest.FixtureRequest, shipped: VolleyProcess) -> str:
    return shipped.grpc if request.param == "grpc" else shipped.url


@pytest.fixture
def client(url: str) -> Iterator[VolleyClient]:
    with VolleyClient(url, timeout=20) as client:
        yield client


def transactions(n: int, seed: int = 0) -> np.ndarray:
    """Random non-negative raw columns, in graph order."""
    size = (n, len(FEATURES))
    return np.random.default_rng(seed).gamma(2.0, 2.0, size=size).astype(np.float32)


def reference(rows: np.ndarray) -> dict[str, np.ndarray]:
    return ort_outputs(FRAUD_ONNX, {"features": rows})


def scene(tmp_path: Path) -> tuple[SceneImage, Path]:
    """A 640x480 scene (320x240 crop scaled 2x) and its PNG file."""
    truth = scene_image(301, (320, 240), 2.0)
    path = tmp_path / "scene.png"
    path.write_bytes(encode(truth.image, ".png"))
    return truth, path


def matched(truth: SceneImage, detections: list[Detection]) -> float:
    boxes = np.array([d.box for d in detections], dtype=np.float32)
    return matched_fraction(truth, boxes, np.array([d.class_id for d in detections]))


def test_health_ready_and_models(client: VolleyClient) -> None:
    assert client.health() and client.ready()
    assert {(m.name, m.state) for m in client.models()} >= {("fraud", "READY"), ("detect", "READY")}


def test_infer_matches_onnxruntime(client: VolleyClient) -> None:
    rows = transactions(8)
    got = client.infer("fraud", {"features": rows})
    want = reference(rows)
    assert set(got) == {"score", "is_fraud"}
    assert_close(got["score"], want["score"])
    np.testing.assert_array_equal(got["is_fraud"], want["is_fraud"])
    assert set(client.infer("fraud", {"features": rows}, outputs=["score"])) == {"score"}


def test_score_dicts_frame_and_array_agree(client: VolleyClient) -> None:
    rows = transactions(6, seed=1)
    counts = [j for j, name in enumerate(FEATURES) if "count" in name]
    rows[:, counts] = np.round(rows[:, counts])
    want = reference(rows)
    rng = np.random.default_rng(2)
    shuffled = [  # every dict with its own key order: the SDK puts them in the graph's order
        {FEATURES[j]: float(row[j]) for j in rng.permutation(len(FEATURES))} for row in rows
    ]
    order = rng.permutation(len(FEATURES))
    frame = pd.DataFrame(rows[:, order], columns=[FEATURES[j] for j in order])
    frame = frame.astype({FEATURES[j]: "int64" for j in counts})  # counts as integer columns
    for given in (rows, shuffled, frame):
        result = client.score(given)
        assert_close(result.scores, want["score"].reshape(-1))
        np.testing.assert_array_equal(result.decisions, want["is_fraud"].reshape(-1))
        assert result.threshold == pytest.approx(float(FRAUD_PARAMS["threshold"]))
    one = client.score(shuffled[0])
    assert len(one) == 1 and one.scores[0] == pytest.approx(float(want["score"][0, 0]), rel=1e-3)


def test_score_rejects_missing_and_unknown_columns(client: VolleyClient) -> None:
    row = dict(zip(FEATURES, transactions(1)[0].tolist(), strict=True))
    del row["terminal_risk_7d"]
    with pytest.raises(ValueError, match="missing column.*terminal_risk_7d"):
        client.score([row])
    row["terminal_risk_7d"], row["colour"] = 0.0, 1.0
    with pytest.raises(ValueError, match="unknown column.*colour"):
        client.score(row)
    with pytest.raises(ValueError, match="DataFrame: missing column.*amount"):
        client.score(pd.DataFrame(transactions(2)[:, 1:], columns=FEATURES[1:]))
    with pytest.raises(ValueError, match=rf"not \[N, {len(FEATURES)}\]"):
        client.score(transactions(2)[:, :-1])


def test_detect_path_bytes_and_array_in_original_pixels(
    client: VolleyClient, tmp_path: Path
) -> None:
    truth, path = scene(tmp_path)
    assert (truth.width, truth.height) == (640, 480)
    images = [path, str(path), encode(truth.image, ".jpg"), truth.image]
    for image in images:
        assert matched(truth, client.detect(image)) >= MATCHED_FLOOR, type(image)
    many = client.detect_many(images)
    assert [len(found) for found in many] == [len(client.detect(image)) for image in images]
    only = client.detect(truth.image, score_threshold=0.5, classes=[truth.labels[0]])
    assert only and all(d.class_id == truth.labels[0] and d.score >= 0.5 for d in only)


def test_errors_carry_the_servers_message_and_status(
    client: VolleyClient, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="clients.sdk")
    grpc = not url.startswith("http")
    with pytest.raises(ModelNotFound, match="unknown model.*'nope'") as missing:
        client.infer("nope", {"features": transactions(1)})
    assert missing.value.status == ("NOT_FOUND" if grpc else "404")
    with pytest.raises(InvalidInput, match=rf"expects \[-1, {len(FEATURES)}\]") as bad:
        client.infer("fraud", {"features": transactions(2)[:, :3]})
    assert bad.value.status == ("INVALID_ARGUMENT" if grpc else "400")
    with pytest.raises(InvalidInput, match="not a JPEG, PNG, WebP or BMP"):
        client.detect(b"not an image")
    assert not [r for r in caplog.records if r.name == "clients.sdk"]  # 400, 404: no retry


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_unreachable_server_is_retried_then_unavailable(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="clients.sdk")
    url = f"{scheme}127.0.0.1:{free_port()}"
    for retries in (0, 3):
        caplog.clear()
        start = time.monotonic()
        with VolleyClient(url, retries=retries, backoff=0.05) as client:
            with pytest.raises(Unavailable) as failure:
                client.infer("fraud", {"features": transactions(1)})
            assert not client.health()
        retried = [r for r in caplog.records if r.name == "clients.sdk"]
        assert len(retried) == 2 * retries  # infer, then health
        assert time.monotonic() - start >= 2 * 0.05 * (2**retries - 1)
        assert failure.value.status == "UNAVAILABLE"


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_timeout_raises_deadline_exceeded(scheme: str) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        url = f"{scheme}127.0.0.1:{silent.getsockname()[1]}"
        with VolleyClient(url, timeout=0.3) as client, pytest.raises(DeadlineExceeded):
            client.infer("fraud", {"features": transactions(1)})
        assert 0.25 < time.monotonic() - start < 5


def test_url_forms() -> None:
    assert Endpoint.parse("localhost:8001") == Endpoint("grpc", "localhost:8001")
    assert Endpoint.parse("grpc://h:1") == Endpoint("grpc", "h:1")
    assert Endpoint.parse("http://h:8000/") == Endpoint("http", "h:8000")
    assert Endpoint.parse("https://h:443") == Endpoint("http", "h:443", ssl=True)
    with pytest.raises(ValueError, match="url must be"):
        VolleyClient("ftp://h:1")


def test_status_kinds() -> None:
    assert isinstance(error("queue full", "429"), Overloaded)
    assert isinstance(error("queue full", "StatusCode.RESOURCE_EXHAUSTED"), Overloaded)
    assert isinstance(error("draining", "503"), Unavailable)
    assert isinstance(error("late", "504"), DeadlineExceeded)
    assert type(error("too big", "413")) is VolleyError
    assert str(error("unknown model 'x'", "404")) == "[404] unknown model 'x'"


def test_stream_answers_every_frame(shipped: VolleyProcess, tmp_path: Path) -> None:
    truth, _ = scene(tmp_path)
    frames: list[bytes | np.ndarray] = [encode(truth.image, ".jpg"), truth.image] * 12
    frames.insert(0, b"garbage")  # the first frame is never replaced: it fails
    with VolleyClient(shipped.grpc) as client:
        results = list(client.stream(frames))
    assert sorted(int(r.id) for r in results) == list(range(len(frames)))
    by_id = {r.id: r for r in results}
    assert by_id["0"].status == "error" and "not a JPEG" in (by_id["0"].error or "")
    done = [r for r in results if r.status == "processed"]
    assert done and all("total_us" in r.timings for r in done)
    assert all(matched(truth, r.detections) >= MATCHED_FLOOR for r in done)
    assert all(r.skip_reason for r in results if r.status == "skipped")
    assert {r.status for r in results} <= {"processed", "skipped", "error"}


def test_a_stream_the_server_ends_on_shutdown_raises_unavailable(tmp_path: Path) -> None:
    """A camera streaming through the server's SIGTERM gets the answers to the frames the
    server took, then `Unavailable` at once (so it can reconnect elsewhere), not a wait for
    answers that will never come."""
    truth, _ = scene(tmp_path)
    frame = encode(truth.image, ".jpg")

    def camera() -> Iterator[bytes]:
        for _ in range(300):  # 20 s at 15 FPS: past the end of the server
            yield frame
            time.sleep(1 / 15)

    results = []
    with serving(copy_shipped_models(tmp_path)) as proc, VolleyClient(proc.grpc) as client:
        with pytest.raises(Unavailable, match="server is shutting down"):
            for result in client.stream(camera()):
                results.append(result)
                if len(results) == 10:
                    proc.proc.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
        assert time.monotonic() - signalled < 10
    assert len(results) >= 10 and {r.status for r in results} <= {"processed", "skipped", "error"}
    assert any(r.status == "processed" for r in results)


def test_stream_needs_grpc(shipped: VolleyProcess) -> None:
    with VolleyClient(shipped.url) as client, pytest.raises(VolleyError, match="needs gRPC"):
        client.stream([b""])
    with VolleyClient(shipped.grpc) as client, pytest.raises(ModelNotFound):
        list(client.stream([b""], model="nope"))


async def test_async_client(url: str, tmp_path: Path) -> None:
    truth, path = scene(tmp_path)
    rows = transactions(4, seed=3)
    async with AsyncVolleyClient(url, timeout=20) as client:
        assert await client.ready()
        assert "fraud" in {m.name for m in await client.models()}
        got = await client.infer("fraud", {"features": rows})
        assert_close(got["score"], reference(rows)["score"])
        scores = await client.score([dict(zip(FEATURES, r.tolist(), strict=True)) for r in rows])
        assert_close(scores.scores, got["score"].reshape(-1))
        assert matched(truth, await client.detect(path)) >= MATCHED_FLOOR
        with pytest.raises(ModelNotFound, match="unknown model"):
            await client.infer("nope", {"features": rows})
        if url.startswith("http"):
            with pytest.raises(VolleyError, match="needs gRPC"):
                client.stream([])
            return
        results = [r async for r in client.stream([encode(truth.image, ".jpg")] * 5)]
    assert sorted(r.id for r in results) == ["0", "1", "2", "3", "4"]
    assert any(r.status == "processed" for r in results)


def example(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "examples" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_examples_run(shipped: VolleyProcess) -> None:
    scripts = {p.name for p in (ROOT / "clients" / "examples").glob("*.py")}
    assert scripts == {
        "score_transactions.py",
        "detect_image.py",
        "stream_video.py",
        "async_client.py",
    }
    out = example("score_transactions.py", "--url", shipped.grpc)
    assert "groceries at noon" in out and "ok" in out and "FRAUD" in out
    out = example("detect_image.py", "--url", shipped.url, "docs/samples/street-2.jpg")
    assert "street-2.jpg: " in out and "box [" in out
    out = example("stream_video.py", "--url", shipped.grpc, "--max-frames", "12")
    assert out.count("frame ") == 12 and "summary: processed=" in out
    out = example("async_client.py", "--url", shipped.url)
    assert "fraud scores:" in out and "street-1.jpg:" in out and "detect (READY)" in out
