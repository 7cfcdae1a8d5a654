"""`volley serve --busy-poll-us`: once the last held request is answered, the event loop keeps
polling for the window instead of sleeping, then sleeps; without the flag it sleeps at once.

Seen from outside as the server process's CPU time after an answer (a polling loop keeps its
core busy, a sleeping one uses none), and from inside on a real event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving
from reference import assert_close, ort_outputs

from server.busy_poll import BusyPoll
from server.held import HeldRequests

WINDOW_S = 0.5
TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("busy_poll") / "models"
    model = onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    onnx_models.write_config(
        root / "mlp", {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 0}}
    )
    return root, model


@pytest.fixture(scope="module")
def polling(repository: tuple[Path, Path]) -> Iterator[VolleyProcess]:
    with serving(repository[0], "--busy-poll-us", str(int(WINDOW_S * 1e6))) as proc:
        yield proc


@pytest.fixture(scope="module")
def sleeping(repository: tuple[Path, Path]) -> Iterator[VolleyProcess]:
    with serving(repository[0]) as proc:
        yield proc


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_over(pid: int, seconds: float) -> float:
    """CPU seconds the process uses in the next `seconds` of wall time."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def infer_http(proc: VolleyProcess, model: Path, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((1, 32)).astype(np.float32)
    with httpclient.InferenceServerClient(proc.http) as client:
        tensor = httpclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        answer = client.infer("mlp", [tensor]).as_numpy("score")
    assert_close(answer, ort_outputs(model, {"input": x})["score"])


def infer_grpc(proc: VolleyProcess, model: Path, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((1, 32)).astype(np.float32)
    with grpcclient.InferenceServerClient(proc.grpc) as client:
        tensor = grpcclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer("mlp", [tensor]).as_numpy("score")
    assert_close(answer, ort_outputs(model, {"input": x})["score"])


@pytest.mark.parametrize("infer", [infer_http, infer_grpc], ids=["http", "grpc"])
def test_the_loop_polls_for_the_window_after_an_answer_then_sleeps(
    polling: VolleyProcess, repository: tuple[Path, Path], infer
) -> None:
    pid = polling.proc.pid
    infer(polling, repository[1], seed=1)
    during = cpu_over(pid, WINDOW_S * 0.8)
    time.sleep(WINDOW_S * 0.4)  # the window has ended
    after = cpu_over(pid, WINDOW_S)
    assert during >= WINDOW_S * 0.8 * 0.5, f"{during:.2f} s of CPU while it should poll"
    assert after <= WINDOW_S * 0.1, f"{after:.2f} s of CPU after the window"
    infer(polling, repository[1], seed=2)  # answered as well while polling
    infer(polling, repository[1], seed=3)


def test_without_the_flag_the_loop_sleeps_at_once(
    sleeping: VolleyProcess, repository: tuple[Path, Path]
) -> None:
    infer_http(sleeping, repository[1], seed=4)
    infer_grpc(sleeping, repository[1], seed=5)
    assert cpu_over(sleeping.proc.pid, WINDOW_S) <= WINDOW_S * 0.1


def test_a_negative_or_huge_window_is_refused(repository: tuple[Path, Path]) -> None:
    for value in ("-1", "2000000", "soon"):
        proc = VolleyProcess(repository[0], "--busy-poll-us", value)
        assert proc.proc.wait(30) == 2
        proc.stop()
        assert "--busy-poll-us" in proc.log() and "microseconds" in proc.log()


def test_polling_keeps_the_loop_responsive_and_ends_after_the_last_touch() -> None:
    async def scenario() -> tuple[bool, bool, float, bool]:
        loop = asyncio.get_running_loop()
        poll = BusyPoll(loop, 50_000)
        poll.touch()
        started = poll.polling
        await asyncio.sleep(0.03)
        poll.touch()  # the window restarts from here
        fired = time.perf_counter()
        await asyncio.sleep(0.01)  # a timer still fires on time while the loop polls
        late = time.perf_counter() - fired - 0.01
        await asyncio.sleep(0.03)
        still = poll.polling  # 40 ms after the second touch: inside its window
        await asyncio.sleep(0.05)
        return started, still, late, poll.polling

    started, still, late, after = asyncio.run(scenario())
    assert started and still and not after
    assert late < 0.01


def test_only_the_last_release_starts_polling() -> None:
    async def scenario() -> list[bool]:
        held = HeldRequests()
        held.busy_poll = BusyPoll(asyncio.get_running_loop(), 1_000_000)
        held.count = 2
        held.release()
        seen = [held.busy_poll.polling]
        held.release()
        seen.append(held.busy_poll.polling)
        held.busy_poll = None  # the pending poll ends with the loop
        return seen

    assert asyncio.run(scenario()) == [False, True]
