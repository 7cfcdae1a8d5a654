"""`decode_processes`: a pipeline's encoded images decoded in helper processes, not threads.

The shipped repository gains `detect_procs`, the same pipeline over the same detector with two
decoder processes; both pipelines must answer every image alike, refuse bad images alike, and
the decoders must survive being killed and never outlive their server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from conftest import VolleyProcess, child_processes, copy_shipped_models, running, serving
from metrics_scrape import scrape
from test_detection_pipeline import png_declaring
from test_repository import wait_for
from tritonclient.utils import InferenceServerException
from vision_scenes import encode, scene_image

PROCESSES = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    repository = copy_shipped_models(tmp_path_factory.mktemp("decoders"))
    config = yaml.safe_load((repository / "detect" / "config.yaml").read_text())
    (repository / "detect_procs").mkdir()
    (repository / "detect_procs" / "config.yaml").write_text(
        yaml.safe_dump({**config, "decode_processes": PROCESSES})
    )
    with serving(repository) as proc:
        yield proc


def decoders(server_pid: int) -> set[int]:
    """The live decoder processes the server started (its children running the decoder module)."""
    children = child_processes(server_pid, b"server.pipelines.decoder_process")
    return {pid for pid in children if running(pid)}


def detect(proc: VolleyProcess, model: str, blobs: list[bytes]) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(proc.http)
    tensor = httpclient.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    try:
        return client.infer(model, [tensor])
    finally:
        client.close()


def test_decoder_processes_answer_like_threads(server: VolleyProcess) -> None:
    blobs = [encode(scene_image(seed, (320, 240), 2.0).image, ext)
             for seed, ext in enumerate([".jpg", ".png", ".webp", ".bmp", ".jpg"])]  # fmt: skip
    threads, procs = detect(server, "detect", blobs), detect(server, "detect_procs", blobs)
    counts = threads.as_numpy("num_detections")
    assert counts.sum() > 10
    np.testing.assert_array_equal(procs.as_numpy("num_detections"), counts)
    np.testing.assert_array_equal(procs.as_numpy("class_ids"), threads.as_numpy("class_ids"))
    np.testing.assert_allclose(procs.as_numpy("boxes"), threads.as_numpy("boxes"), atol=0.5)
    np.testing.assert_allclose(procs.as_numpy("scores"), threads.as_numpy("scores"), atol=1e-3)
    assert len(decoders(server.proc.pid)) == PROCESSES


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"not an image at all", "image 1: not a JPEG, PNG, WebP or BMP image"),
        (png_declaring(100_000, 100_000), "image 1: 100000x100000 is 10000000000 pixels"),
    ],
)
def test_bad_images_are_refused_by_name(server: VolleyProcess, bad: bytes, message: str) -> None:
    good = encode(scene_image(2, (320, 240), 2.0).image)
    for model in ("detect", "detect_procs"):
        with pytest.raises(InferenceServerException) as caught:
            detect(server, model, [good, bad])
        assert caught.value.status() == "400"
        assert message in caught.value.message()
    truncated = good[: len(good) // 2]
    with pytest.raises(InferenceServerException) as caught:
        detect(server, "detect_procs", [truncated])
    assert caught.value.status() == "400"
    assert "truncated or corrupt" in caught.value.message()
    assert detect(server, "detect_procs", [good]).as_numpy("num_detections")[0] > 0


def test_a_killed_decoder_is_replaced(server: VolleyProcess) -> None:
    good = encode(scene_image(3, (320, 240), 2.0).image)
    before = decoders(server.proc.pid)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    # Each dead decoder fails at most the one image it is given with a clean 500; then the
    # pool has replaced it and every request succeeds.
    outcomes = []
    for _ in range(PROCESSES + 4):
        try:
            outcomes.append(
                int(detect(server, "detect_procs", [good]).as_numpy("num_detections")[0])
            )
        except InferenceServerException as exc:
            assert exc.status() == "500" and "decoder process failed" in exc.message()
            outcomes.append(-1)
    assert outcomes.count(-1) <= PROCESSES
    assert all(n > 0 for n in outcomes[PROCESSES:])
    after = decoders(server.proc.pid)
    assert len(after) == PROCESSES and not after & before
    assert '"event":"decoder_failed"' in server.log()
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    failures = samples[("volley_decoder_failures_total", frozenset({("model", "detect_procs")}))]
    assert failures == outcomes.count(-1) > 0


def test_callers_that_leave_cost_no_decoder(server: VolleyProcess) -> None:
    """gRPC calls whose deadline passes while their images decode are cancelled in the server;
    the decoders finish those jobs and serve the next request: none is restarted."""
    before = decoders(server.proc.pid)
    blob = encode(scene_image(4, (320, 240), 4.0).image)  # 1280x960: several ms to decode
    client = grpcclient.InferenceServerClient(server.grpc)
    tensor = grpcclient.InferInput("images", [8], "BYTES")
    tensor.set_data_from_numpy(np.array([blob] * 8, dtype=np.object_))
    try:
        for _ in range(10):
            with pytest.raises(InferenceServerException) as caught:
                client.infer("detect_procs", [tensor], client_timeout=0.005)
            assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()
    time.sleep(0.5)
    assert detect(server, "detect_procs", [blob] * 4).as_numpy("num_detections").min() > 0
    assert decoders(server.proc.pid) == before


def test_streams_use_the_decoders(server: VolleyProcess) -> None:
    good = encode(scene_image(1, (320, 240), 2.0).image)
    answers = []
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    try:
        for i in range(3):
            tensor = grpcclient.InferInput("images", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([good], dtype=np.object_))
            client.async_stream_infer("detect_procs", [tensor], request_id=f"frame-{i}")
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while len(answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.stop_stream()
        client.close()
    assert [error for _, error in answers] == [None] * 3
    assert all(result.as_numpy("num_detections")[0] > 0 for result, _ in answers)


def test_decoders_end_with_unload_and_with_their_server(tmp_path: Path) -> None:
    repository = copy_shipped_models(tmp_path)
    config_file = repository / "detect" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "decode_processes": PROCESSES}))
    (repository / "orphan").mkdir()  # a pipeline that cannot load starts no decoder
    broken = {**config, "detector": "missing", "decode_processes": PROCESSES}
    (repository / "orphan" / "config.yaml").write_text(yaml.safe_dump(broken))
    with serving(repository, exit_code=None) as proc:  # it ends SIGKILLed
        state = requests.post(f"{proc.url}/v2/repository/index", timeout=10).json()
        assert {m["name"]: m["state"] for m in state}["orphan"] == "UNAVAILABLE"
        assert len(decoders(proc.proc.pid)) == PROCESSES
        r = requests.post(f"{proc.url}/v2/repository/models/detect/unload", timeout=30)
        assert r.status_code == 200
        wait_for(lambda: not decoders(proc.proc.pid), "decoders to exit", timeout=10)
        r = requests.post(f"{proc.url}/v2/repository/models/detect/load", timeout=60)
        assert r.status_code == 200
        started = decoders(proc.proc.pid)
        assert len(started) == PROCESSES
        proc.proc.kill()  # SIGKILL: no drain, no cleanup; the decoders must still go
        proc.proc.wait()
        wait_for(lambda: not any(running(pid) for pid in started), "orphans to exit", timeout=10)


def test_decoders_that_keep_dying_are_replaced_at_a_pace(tmp_path: Path) -> None:
    """Past as many deaths as the pool has decoders (within 10 s), replacements come one a
    second: images that crash a codec cannot make the server spend its CPU starting processes."""
    repository = copy_shipped_models(tmp_path)
    config_file = repository / "detect" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "decode_processes": PROCESSES}))
    good = encode(scene_image(5, (320, 240), 2.0).image)
    with serving(repository) as proc:
        for _ in range(2):  # 2 x PROCESSES deaths in a few seconds
            killed = decoders(proc.proc.pid)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda killed=killed: not any(map(running, killed)), "kills", timeout=10)
            for _ in killed:
                with pytest.raises(InferenceServerException) as caught:
                    detect(proc, "detect", [good])
                assert caught.value.status() == "500", caught.value.message()
        assert decoders(proc.proc.pid) == set()  # none started at once the second time
        started = time.monotonic()
        assert detect(proc, "detect", [good]).as_numpy("num_detections")[0] > 0  # it waits
        assert 0.5 < time.monotonic() - started < 5
        wait_for(lambda: len(decoders(proc.proc.pid)) == PROCESSES, "replacements", timeout=10)
        assert proc.log().count('"event":"decoders_paced"') == 1


def test_a_stuck_decoder_is_killed_and_replaced(tmp_path: Path) -> None:
    """A decoder that stops answering (here SIGSTOPped, as a codec stuck on an image would be)
    fails its image with a 500 once `decode_timeout_ms` has passed, and is killed and replaced:
    it holds no decoder, and no request, for longer than that."""
    repository = copy_shipped_models(tmp_path)
    config_file = repository / "detect" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    stuck_config = {**config, "decode_processes": 1, "decode_timeout_ms": 1000}
    config_file.write_text(yaml.safe_dump(stuck_config))
    good = encode(scene_image(6, (320, 240), 2.0).image)
    with serving(repository) as proc:
        (stuck,) = decoders(proc.proc.pid)
        os.kill(stuck, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            detect(proc, "detect", [good])
        waited = time.monotonic() - started
        assert caught.value.status() == "500"
        assert (
            "image 0: not decoded within 1 s; its decoder process was replaced"
            in caught.value.message()
        )
        assert "request id" in caught.value.message()
        assert 0.9 < waited < 5
        wait_for(lambda: not running(stuck), "the stuck decoder to be killed", timeout=5)
        assert detect(proc, "detect", [good]).as_numpy("num_detections")[0] > 0
        (replacement,) = decoders(proc.proc.pid)
        assert replacement != stuck
        assert "no answer in 1 s" in proc.log()
        samples = scrape(f"http://127.0.0.1:{proc.metrics_port}/metrics")
        failures = samples[("volley_decoder_failures_total", frozenset({("model", "detect")}))]
        assert failures == 1
