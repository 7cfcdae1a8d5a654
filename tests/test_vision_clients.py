"""The vision clients, `volley detect` and `volley camera`, as a user runs them: real CLI processes
against a real server on a copy of the shipped model repository (`models/detect`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import conftest
import cv2
import numpy as np
import pytest
from conftest import ROOT, VolleyProcess, copy_shipped_models, free_port, serving
from vision_scenes import SceneImage, encode, matched_fraction, scene_image

MATCHED_FLOOR = 0.7  # share of ground-truth objects found (same class, IoU >= 0.5)
FRAME_SIZE = (320, 240)
VIDEO_FPS = 15
SCENES_IN_VIDEO = 6
SCENE_FRAMES = 5  # frame k (1-based) shows scene ((k - 1) // 5) % 6, like a slowly moving camera
# (seed, crop (w, h), scale, extension): several sizes, aspect ratios and formats
IMAGES = [
    (101, (320, 240), 2.0, ".jpg"),
    (102, (240, 320), 1.5, ".png"),
    (103, (320, 320), 1.0, ".jpg"),
    (104, (300, 150), 2.5, ".png"),
    (105, (200, 280), 1.0, ".jpg"),
]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped repository (the server may not write into the source tree)."""
    return copy_shipped_models(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="module")
def shipped(repository: Path) -> Iterator[VolleyProcess]:
    with serving(repository) as proc:
        yield proc


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, SceneImage]]:
    folder = tmp_path_factory.mktemp("scenes")
    written = []
    for seed, crop, scale, ext in IMAGES:
        scene = scene_image(seed, crop, scale)
        path = folder / f"scene{seed}{ext}"
        path.write_bytes(encode(scene.image, ext))
        written.append((path, scene))
    return written


def video_scenes() -> list[SceneImage]:
    return [scene_image(200 + i, FRAME_SIZE) for i in range(SCENES_IN_VIDEO)]


def write_video(path: Path, frames: int) -> Path:
    """An MJPG .avi of `frames` frames at 15 FPS cycling through the video scenes."""
    scenes = [cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR) for s in video_scenes()]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), VIDEO_FPS, FRAME_SIZE)
    assert writer.isOpened()
    for k in range(frames):
        writer.write(scenes[k // SCENE_FRAMES % len(scenes)])
    writer.release()
    return path


def volley(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def camera(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "server", "camera", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def processed(log: list[dict]) -> list[dict]:
    return [r for r in log if r["status"] == "processed"]


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            errors = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"camera exited ({proc.returncode}) before {what}: {errors}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def video_frames(path: Path) -> tuple[int, tuple[int, int]]:
    """Frame count and (width, height) of a video, by reading it back."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    count, size = 0, (0, 0)
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, size = count + 1, (frame.shape[1], frame.shape[0])
    capture.release()
    return count, size


def summary(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("summary:"))
    return {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_detect_json_finds_the_objects_in_original_pixels(
    shipped: VolleyProcess, scenes: list[tuple[Path, SceneImage]], protocol: str
) -> None:
    server = shipped.grpc if protocol == "grpc" else shipped.http
    paths = [str(path) for path, _ in scenes]
    run = volley("detect", *paths, "--server", server, "--protocol", protocol, "--json")
    assert run.returncode == 0, run.stderr
    answers = json.loads(run.stdout)
    assert [a["image"] for a in answers] == paths
    found = total = 0
    for answer, (_, truth) in zip(answers, scenes, strict=True):
        assert (answer["width"], answer["height"]) == (truth.width, truth.height)
        dets = answer["detections"]
        boxes = np.array([d["box"] for d in dets], dtype=np.float32).reshape(-1, 4)
        labels = np.array([d["class_id"] for d in dets], dtype=np.int64)
        assert all(d["class_name"] == str(d["class_id"]) for d in dets)
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True)
        assert (boxes[:, [0, 2]] >= -1).all() and (boxes[:, [0, 2]] <= truth.width + 1).all()
        assert (boxes[:, [1, 3]] >= -1).all() and (boxes[:, [1, 3]] <= truth.height + 1).all()
        found += matched_fraction(truth, boxes, labels) * len(truth.boxes)
        total += len(truth.boxes)
    assert total >= 10
    assert found / total >= MATCHED_FLOOR, (found, total)


def test_detect_filters_by_class_and_score(
    shipped: VolleyProcess, scenes: list[tuple[Path, SceneImage]]
) -> None:
    wanted = {int(c) for _, s in scenes for c in s.labels[:2]}
    classes = ",".join(str(c) for c in sorted(wanted))
    paths = [str(path) for path, _ in scenes]
    args = ["--server", shipped.grpc, "--json", "--classes", classes, "--score-threshold", "0.6"]
    run = volley("detect", *paths, *args)
    assert run.returncode == 0, run.stderr
    dets = [d for a in json.loads(run.stdout) for d in a["detections"]]
    assert dets, "expected detections of the requested classes"
    assert {d["class_id"] for d in dets} <= wanted
    assert min(d["score"] for d in dets) >= 0.6


def test_detect_table_and_save_annotated_copies(
    shipped: VolleyProcess, scenes: list[tuple[Path, SceneImage]], tmp_path: Path
) -> None:
    paths = [path for path, _ in scenes[:2]]
    out = tmp_path / "annotated"
    run = volley("detect", *map(str, paths), "--server", shipped.grpc, "--save", str(out))
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.splitlines()
    assert header.split() == ["image", "class", "score", "box"]
    assert {row.split()[0] for row in rows} == {str(p) for p in paths}
    for path in paths:
        saved = out / path.name
        assert saved.is_file(), sorted(out.iterdir())
        original = cv2.imread(str(path))
        annotated = cv2.imread(str(saved))
        assert annotated is not None and annotated.shape == original.shape
        changed = np.abs(annotated.astype(int) - original.astype(int)).max(axis=2) > 40
        assert changed.mean() > 0.001  # boxes and captions drawn, not just re-encoded


def test_detect_errors_are_one_clear_line(
    shipped: VolleyProcess, scenes: list[tuple[Path, SceneImage]], tmp_path: Path
) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    run = volley("detect", str(scenes[0][0]), str(text), "--server", shipped.grpc)
    assert run.returncode == 1
    assert run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "notes.jpg" in run.stderr and "image" in run.stderr

    missing = volley("detect", str(tmp_path / "absent.png"), "--server", shipped.grpc)
    assert missing.returncode == 1 and "absent.png" in missing.stderr

    for protocol, server in (("grpc", shipped.grpc), ("http", shipped.http)):
        wrong = volley("detect", str(scenes[0][0]), "--server", server, "--protocol", protocol,
                       "--model", "no_such_model")  # fmt: skip
        assert wrong.returncode == 1, wrong.stdout
        assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
        assert "no_such_model" in wrong.stderr

    nobody = f"127.0.0.1:{free_port()}"
    for protocol in ("grpc", "http"):
        down = volley("detect", str(scenes[0][0]), "--server", nobody, "--protocol", protocol)
        assert down.returncode == 1
        assert len(down.stderr.strip().splitlines()) == 1, down.stderr
        assert "cannot reach" in down.stderr and nobody in down.stderr


def test_camera_headless_writes_video_and_log(shipped: VolleyProcess, tmp_path: Path) -> None:
    video = write_video(tmp_path / "in.avi", 60)
    out, log = tmp_path / "annotated.avi", tmp_path / "frames.jsonl"
    args = ["--server", shipped.grpc, "--headless", "--out", str(out), "--log", str(log)]
    started = time.monotonic()
    run = volley("camera", str(video), *args)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert elapsed >= 60 / VIDEO_FPS * 0.8  # paced like a 15 FPS camera, not as fast as possible

    frames, size = video_frames(out)
    assert 40 <= frames <= 60 and size == FRAME_SIZE

    records = read_log(log)
    assert records and all(
        {"id", "status", "latency_ms", "detections", "error"} <= r.keys() for r in records
    )
    assert {r["status"] for r in records} <= {"processed", "skipped", "error"}
    done = processed(records)
    assert len(done) >= 10, [r["status"] for r in records]
    assert all(r["latency_ms"] is not None and 0 < r["latency_ms"] < 10_000 for r in done)
    counts = summary(run.stdout)
    assert counts["processed"] == len(done)
    assert counts["skipped"] == sum(r["status"] == "skipped" for r in records)

    # the boxes are those of the frames' objects, in the frames' pixels
    truths = video_scenes()
    found = total = 0
    for record in done:
        truth = truths[(int(record["id"]) - 1) // SCENE_FRAMES % SCENES_IN_VIDEO]
        boxes = np.array([d["box"] for d in record["detections"]], np.float32).reshape(-1, 4)
        labels = np.array([d["class_id"] for d in record["detections"]])
        found += matched_fraction(truth, boxes, labels) * len(truth.boxes)
        total += len(truth.boxes)
    assert found / total >= MATCHED_FLOOR - 0.1, (found, total)


def test_camera_setup_errors_are_one_clear_line(tmp_path: Path) -> None:
    video = write_video(tmp_path / "in.avi", 5)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    cases = [({**env}, [str(video)])]  # a window is asked for, but there is no display
    if "GUI:                           NONE" in cv2.getBuildInformation():
        cases.append(({**env, "DISPLAY": ":99"}, [str(video)]))  # cv2.imshow itself fails
    for environment, args in cases:
        run = subprocess.run(
            [sys.executable, "-m", "server", "camera", *args, "--server", "127.0.0.1:1"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, env=environment,
        )  # fmt: skip
        assert run.returncode == 1
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "--headless" in run.stderr

    missing = volley("camera", str(tmp_path / "absent.avi"), "--headless")
    assert missing.returncode == 1 and "absent.avi" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


@contextmanager
def serving_on_ports(
    repository: Path, ports: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> Iterator[VolleyProcess]:
    """`serving`, but on fixed (http, grpc, metrics) ports, so a restart keeps the address."""
    picks = iter(ports)
    with monkeypatch.context() as patch:
        patch.setattr(conftest, "free_port", lambda: next(picks))
        proc = VolleyProcess(repository)
    try:
        proc.wait_models()
        yield proc
    finally:
        proc.stop()


def test_camera_reconnects_after_a_server_restart(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "long.avi", 20 * VIDEO_FPS)
    out, log = tmp_path / "annotated.avi", tmp_path / "frames.jsonl"
    ports = (free_port(), free_port(), free_port())
    with serving_on_ports(repository, ports, monkeypatch) as first:
        cam = camera(str(video), "--server", first.grpc, "--headless", "--out", str(out),
                     "--log", str(log))  # fmt: skip
        try:
            wait_for(lambda: len(processed(read_log(log))) >= 5, 20, "first answers", cam)
            assert first.stop() == 0
        except BaseException:
            cam.kill()
            raise
    before = max(int(r["id"]) for r in processed(read_log(log)))
    restarted = time.monotonic()
    try:
        with serving_on_ports(repository, ports, monkeypatch):
            stdout, stderr = cam.communicate(timeout=60)
    finally:
        if cam.poll() is None:
            cam.kill()
    assert cam.returncode == 0, stderr
    after = [r for r in processed(read_log(log)) if int(r["id"]) > before]
    assert len(after) >= 5, (before, time.monotonic() - restarted, stderr)
    assert any(r["detections"] for r in after)
    counts = summary(stdout)
    assert counts["reconnects"] >= 1 and counts["offline"] > 0
    assert video_frames(out)[0] >= 0.8 * 20 * VIDEO_FPS  # frames kept flowing while offline


def test_camera_stops_cleanly_on_sigint(shipped: VolleyProcess, tmp_path: Path) -> None:
    video = write_video(tmp_path / "long.avi", 20 * VIDEO_FPS)
    out, log = tmp_path / "annotated.mp4", tmp_path / "frames.jsonl"
    cam = camera(str(video), "--server", shipped.grpc, "--headless", "--out", str(out),
                 "--log", str(log))  # fmt: skip
    try:
        wait_for(lambda: len(processed(read_log(log))) >= 3, 20, "first answers", cam)
        cam.send_signal(signal.SIGINT)
        stdout, stderr = cam.communicate(timeout=15)
    finally:
        if cam.poll() is None:
            cam.kill()
    assert cam.returncode == 0, stderr
    assert "Traceback" not in stderr
    counts = summary(stdout)
    assert counts["processed"] >= 3 and counts["frames"] < 20 * VIDEO_FPS
    frames, size = video_frames(out)
    assert frames == counts["frames"] and size == FRAME_SIZE
    assert len(read_log(log)) == len(log.read_text().splitlines())  # every line complete
