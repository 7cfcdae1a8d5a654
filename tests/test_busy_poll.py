"""`volley serve --busy-poll-us`: once the last held request is answered, the event loop keeps
polling for the window instead of sleeping, then sleeps. By default only when the request came
within the window of the loop's last idle time (a client sending one request after another);
with `--busy-poll-always` after every answer; with a window of 0 it sleeps at once.

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

WINDOW_S = 1.0
TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("busy_poll") / "models"
    model = onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    # ONNX Runtime's intra-op threads spin after each run (30-40 ms of CPU here): off, so the
    # only CPU after an answer is the event loop's, which is what these tests watch.
    onnx_models.write_config(
        root / "mlp",
        {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 0},
         "intra_op_spinning": False},
    )  # fmt: skip
    return root, model


WINDOW = ("--busy-poll-us", str(int(WINDOW_S * 1e6)))


@pytest.fixture(scope="module")
def polling(repository: tuple[Path, Path]) -> Iterator[VolleyProcess]:
    with serving(repository[0], *WINDOW, "--busy-poll-always") as proc:
        yield proc


@pytest.fixture(scope="module")
def adaptive(repository: tuple[Path, Path]) -> Iterator[VolleyProcess]:
    with serving(repository[0], *WINDOW) as proc:
        yield proc


@pytest.fixture(scope="module")
def sleeping(repository: tuple[Path, Path]) -> Iterator[VolleyProcess]:
    with serving(repository[0], "--busy-poll-us", "0") as proc:
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


def features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 32)).astype(np.float32)


def infer_http(proc: VolleyProcess, x: np.ndarray) -> np.ndarray:
    with httpclient.InferenceServerClient(proc.http) as client:
        tensor = httpclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        return client.infer("mlp", [tensor]).as_numpy("score")


def infer_grpc(proc: VolleyProcess, x: np.ndarray) -> np.ndarray:
    with grpcclient.InferenceServerClient(proc.grpc) as client:
        tensor = grpcclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("mlp", [tensor]).as_numpy("score")


@pytest.mark.parametrize("infer", [infer_http, infer_grpc], ids=["http", "grpc"])
def test_the_loop_polls_for_the_window_after_an_answer_then_sleeps(
    polling: VolleyProcess, repository: tuple[Path, Path], infer
) -> None:
    pid, model = polling.proc.pid, repository[1]
    x = features(1)
    expected = ort_outputs(model, {"input": x})["score"]  # before: the window starts at the answer
    answer = infer(polling, x)
    during = cpu_over(pid, WINDOW_S * 0.6)
    time.sleep(WINDOW_S * 0.6)  # the window has ended
    after = cpu_over(pid, 0.5)
    assert_close(answer, expected)
    assert during >= WINDOW_S * 0.6 * 0.5, f"{during:.2f} s of CPU while it should poll"
    assert after <= 0.05, f"{after:.2f} s of CPU after the window"
    x = features(2)  # answered as well while polling
    assert_close(infer(polling, x), ort_outputs(model, {"input": x})["score"])


@pytest.mark.parametrize("infer", [infer_http, infer_grpc], ids=["http", "grpc"])
def test_by_default_the_loop_polls_only_while_requests_come_close(
    adaptive: VolleyProcess, repository: tuple[Path, Path], infer
) -> None:
    pid, model = adaptive.proc.pid, repository[1]
    time.sleep(WINDOW_S * 1.2)  # quiet for longer than the window
    x = features(6)
    assert_close(infer(adaptive, x), ort_outputs(model, {"input": x})["score"])
    lone = cpu_over(pid, WINDOW_S * 0.4)  # a lone request: the loop sleeps at once
    x = features(7)  # within the window of the last answer: the loop polls after this one
    assert_close(infer(adaptive, x), ort_outputs(model, {"input": x})["score"])
    close = cpu_over(pid, WINDOW_S * 0.6)
    time.sleep(WINDOW_S * 0.6)  # the window has ended with no request in it
    quiet = cpu_over(pid, 0.3)
    x = features(8)  # came long after: the loop sleeps at once again
    assert_close(infer(adaptive, x), ort_outputs(model, {"input": x})["score"])
    late = cpu_over(pid, 0.5)
    assert lone <= 0.05, f"{lone:.2f} s of CPU after a lone request"
    assert close >= WINDOW_S * 0.6 * 0.5, f"{close:.2f} s of CPU while it should poll"
    assert quiet <= 0.05 and late <= 0.05, f"{quiet:.2f} and {late:.2f} s after the window"


def test_a_window_of_zero_sleeps_at_once(
    sleeping: VolleyProcess, repository: tuple[Path, Path]
) -> None:
    model = repository[1]
    for infer, seed in ((infer_http, 4), (infer_grpc, 5), (infer_http, 9), (infer_grpc, 10)):
        x = features(seed)  # one after another: close enough for the default to poll
        assert_close(infer(sleeping, x), ort_outputs(model, {"input": x})["score"])
    assert cpu_over(sleeping.proc.pid, 0.5) <= 0.05


def test_a_negative_or_huge_window_is_refused(repository: tuple[Path, Path]) -> None:
    for value in ("-1", "2000000", "soon"):
        proc = VolleyProcess(repository[0], "--busy-poll-us", value)
        assert proc.proc.wait(30) == 2
        proc.stop()
        assert "--busy-poll-us" in proc.log() and "microseconds" in proc.log()


def test_polling_keeps_the_loop_responsive_and_ends_after_the_last_touch() -> None:
    async def scenario() -> tuple[bool, bool, float, bool]:
        loop = asyncio.get_running_loop()
        poll = BusyPoll(loop, 50_000, always=True)
        poll.idle()
        started = poll.polling
        await asyncio.sleep(0.03)
        poll.idle()  # the window restarts from here
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
        held.busy_poll = BusyPoll(asyncio.get_running_loop(), 1_000_000, always=True)
        held.count = 2
        held.release()
        seen = [held.busy_poll.polling]
        held.release()
        seen.append(held.busy_poll.polling)
        held.busy_poll = None  # the pending poll ends with the loop
        return seen

    assert asyncio.run(scenario()) == [False, True]


def test_adaptive_polling_follows_the_gap_before_the_last_request() -> None:
    async def scenario() -> list[bool]:
        poll = BusyPoll(asyncio.get_running_loop(), 20_000, always=False)
        seen = []
        poll.busy()  # the first request ever: nothing came close before it
        poll.idle()
        seen.append(poll.polling)
        poll.busy()  # at once after the loop went idle
        poll.idle()
        seen.append(poll.polling)
        await asyncio.sleep(0.05)  # the window ends with no request
        seen.append(poll.polling)
        poll.busy()  # came after the window
        poll.idle()
        seen.append(poll.polling)
        return seen

    assert asyncio.run(scenario()) == [False, True, False, False]


def test_a_request_to_an_idle_loop_ends_the_poll() -> None:
    async def scenario() -> list[bool]:
        held = HeldRequests()
        held.busy_poll = BusyPoll(asyncio.get_running_loop(), 1_000_000, always=True)
        held.count = 1
        held.release()  # idle: polls for a second
        await asyncio.sleep(0.01)
        seen = [held.busy_poll.polling]
        held.add()  # a request came: the threads working on it get the CPU and the GIL
        await asyncio.sleep(0.01)
        seen.append(held.busy_poll.polling)
        held.release()
        seen.append(held.busy_poll.polling)
        held.busy_poll = None  # the pending poll ends with the loop
        return seen

    assert asyncio.run(scenario()) == [True, False, True]
