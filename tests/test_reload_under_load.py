"""Reloads under load: many concurrent clients on both protocols while a model changes version.

Sixteen clients (half HTTP, half gRPC) keep sending requests to one model while a new version
replaces the old one: by a load request, by the repository poller, and by an unload followed by a
load. Each version multiplies its input by its own factor, so every answer says which version
computed it. Every request sent must be answered, by the old or the new version, correctly; only
while the model is unloaded on purpose may a request get the documented 503 / UNAVAILABLE.

The model keeps its one instance busy (a loop of matrix products per batch) and takes at most 4
rows a batch, so requests are always queued: each swap happens with requests in the old
version's queue, which the old version must still answer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving
from metrics_scrape import scrape, total
from onnx import helper, numpy_helper
from tritonclient.utils import InferenceServerException

TIMEOUT = 60.0  # seconds, per request and per wait: the machine is shared
CLIENTS = 16  # even-numbered ones speak HTTP, odd-numbered ones gRPC
WIDTH = 64  # columns of a request's one row
ITERATIONS = 16000  # loop steps per batch: ~45 ms here, so that even on a CPU several times
# faster, 16 clients resend well within the 4 batches ahead of them and requests are always queued
MAX_BATCH = 4  # rows per batch: with 16 clients, about 8 requests are always queued
FACTORS = {1: 1.0, 2: 2.0}  # version -> what it multiplies its input by
MODEL = "scale"
ANSWERS_PER_PHASE = 5  # answers each client must get from a version before the test moves on
UNAVAILABLE = {"503", "StatusCode.UNAVAILABLE"}  # how each protocol says 503 / UNAVAILABLE


def busy_scale(path: Path, factor: float) -> Path:
    """FP32 [B, WIDTH] -> x * factor, after a busy loop whose result is multiplied by 0 and added.

    The loop (`onnx_models.slow`) only costs time; the answer is exactly x * factor.
    """
    onnx_models.slow(path, iterations=ITERATIONS, width=WIDTH)
    model = onnx.load(str(path))
    (loop,) = model.graph.node
    loop.output[0] = "busy"
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(factor, np.float32), "factor"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
            helper.make_node("Mul", ["x", "factor"], ["scaled"]),
            helper.make_node("Add", ["scaled", "nothing"], ["y"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def add_version(model_dir: Path, version: int) -> None:
    """Build `<model_dir>/<version>/model.onnx` beside it and move the folder in whole."""
    staging = model_dir / f".incoming-{version}"
    busy_scale(staging / "model.onnx", FACTORS[version])
    os.rename(staging, model_dir / str(version))


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """One model, version 1 only; a new version replaces it (version policy: latest 1)."""
    root = tmp_path / "models"
    add_version(root / MODEL, 1)
    onnx_models.write_config(
        root / MODEL,
        {
            "max_batch_size": MAX_BATCH,
            "dynamic_batching": {"max_queue_size": 256},
            "intra_op_threads": 1,
            "version_policy": {"latest": 1},
        },
    )
    return root


@dataclass(frozen=True)
class Answer:
    """One request and what came back: a version and output, or an error status."""

    x: np.ndarray = field(repr=False)
    version: str = ""
    y: np.ndarray | None = field(default=None, repr=False)
    status: str = "ok"
    message: str = ""


class Load:
    """CLIENTS threads, each sending one request after the other until stopped."""

    def __init__(self, proc: VolleyProcess) -> None:
        self.proc = proc
        self.answers: list[list[Answer]] = [[] for _ in range(CLIENTS)]
        self.sent = [0] * CLIENTS
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        protocol = httpclient if index % 2 == 0 else grpcclient
        if protocol is httpclient:
            client = httpclient.InferenceServerClient(
                self.proc.http, connection_timeout=TIMEOUT, network_timeout=TIMEOUT
            )
        else:
            client = grpcclient.InferenceServerClient(self.proc.grpc)
        try:
            while not self._stop.is_set():
                x = rng.standard_normal((1, WIDTH)).astype(np.float32)
                self.sent[index] += 1
                self.answers[index].append(self._send(protocol, client, x))
        finally:
            client.close()

    @staticmethod
    def _send(protocol: ModuleType, client: Any, x: np.ndarray) -> Answer:
        """One request; the answer, or the error it got."""
        tensor = protocol.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        try:
            if protocol is httpclient:
                result = client.infer(MODEL, [tensor])
                version = result.get_response()["model_version"]
            else:
                result = client.infer(MODEL, [tensor], client_timeout=TIMEOUT)
                version = result.get_response().model_version
        except InferenceServerException as exc:
            return Answer(x, status=str(exc.status()), message=exc.message())
        except Exception as exc:  # a dropped connection: a request without an answer
            return Answer(x, status="exception", message=repr(exc))
        return Answer(x, version, result.as_numpy("y"))

    def each_client_has(self, count: int, label: str) -> None:
        """Wait until every client got `count` answers labelled `label` (see `label`)."""

        def done() -> bool:
            return all(
                sum(label_of(a) == label for a in answers) >= count for answers in self.answers
            )

        wait_for(done, f"{count} answers '{label}' on every client", self.proc)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a client is stuck"

    @contextmanager
    def running(self) -> Iterator[Load]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop()


def label_of(answer: Answer) -> str:
    """The version that answered, 'unavailable' for a 503 / UNAVAILABLE, else 'error'."""
    if answer.status == "ok":
        return answer.version
    return "unavailable" if answer.status in UNAVAILABLE else "error"


def wait_for(condition: Callable[[], bool], what: str, proc: VolleyProcess) -> None:
    """Poll `condition` until it holds; fail with the server log after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{proc.log()[-3000:]}")
        time.sleep(0.02)


def metric(proc: VolleyProcess, name: str, **labels: str) -> float:
    return total(scrape(proc.url + "/metrics"), name, model=MODEL, **labels)


def wait_for_a_queue(proc: VolleyProcess, version: str) -> None:
    """Wait until requests are queued for `version`: the swap must find some there."""
    wait_for(
        lambda: metric(proc, "volley_queue_depth", version=version) >= MAX_BATCH,
        f"requests queued for version {version}",
        proc,
    )


def check_answers(load: Load, order: list[str]) -> dict[str, int]:
    """Every request got exactly one answer; each answer is right for the version that gave it,
    and each client saw the labels in `order` (e.g. 1 then 2). Returns the count per label."""
    counts: dict[str, int] = dict.fromkeys(order, 0)
    for sent, answers in zip(load.sent, load.answers, strict=True):
        assert len(answers) == sent
        labels = [label_of(a) for a in answers]
        errors = [a for a in answers if label_of(a) not in order]
        assert not errors, errors[:3]
        ranks = [order.index(label) for label in labels]
        assert ranks == sorted(ranks), f"labels out of order: {labels}"
        for answer, label in zip(answers, labels, strict=True):
            counts[label] += 1
            if answer.status == "ok":
                assert answer.y is not None
                np.testing.assert_array_equal(answer.y, answer.x * FACTORS[int(answer.version)])
    return counts


def test_load_request_swaps_versions_under_load(repository: Path) -> None:
    model_dir = repository / MODEL
    with serving(repository) as proc, Load(proc).running() as load:
        load.each_client_has(ANSWERS_PER_PHASE, "1")
        drained = metric(proc, "volley_batch_releases_total", version="1", reason="drain")
        add_version(model_dir, 2)
        wait_for_a_queue(proc, "1")
        client = httpclient.InferenceServerClient(proc.http, network_timeout=TIMEOUT)
        client.load_model(MODEL)  # returns once version 2 serves and version 1 has drained
        client.close()
        load.each_client_has(ANSWERS_PER_PHASE, "2")
        load.stop()
        drains = metric(proc, "volley_batch_releases_total", version="1", reason="drain") - drained
    counts = check_answers(load, ["1", "2"])
    assert counts["1"] >= CLIENTS * ANSWERS_PER_PHASE and counts["2"] >= CLIENTS * ANSWERS_PER_PHASE
    # the swap found requests in the old version's queue (the case under test), answered above
    assert drains > 0


def test_poller_swaps_versions_under_load(repository: Path) -> None:
    model_dir = repository / MODEL
    flags = ("--model-control", "poll", "--poll-repository", "0.5")
    with serving(repository, *flags) as proc, Load(proc).running() as load:
        load.each_client_has(ANSWERS_PER_PHASE, "1")
        drained = metric(proc, "volley_batch_releases_total", version="1", reason="drain")
        wait_for_a_queue(proc, "1")
        add_version(model_dir, 2)  # the poller finds it within half a second
        # clients send one request at a time: once each has answers from version 2, every
        # request version 1 took is answered (and its drained batches counted)
        load.each_client_has(ANSWERS_PER_PHASE, "2")
        load.stop()
        assert metric(proc, "volley_model_ready", version="1") == 0
        drains = metric(proc, "volley_batch_releases_total", version="1", reason="drain") - drained
    counts = check_answers(load, ["1", "2"])
    assert counts["1"] >= CLIENTS * ANSWERS_PER_PHASE and counts["2"] >= CLIENTS * ANSWERS_PER_PHASE
    assert drains > 0  # the swap found requests in the old version's queue


def test_unload_then_load_under_load(repository: Path) -> None:
    model_dir = repository / MODEL
    with serving(repository) as proc, Load(proc).running() as load:
        client = httpclient.InferenceServerClient(proc.http, network_timeout=TIMEOUT)
        load.each_client_has(ANSWERS_PER_PHASE, "1")
        drained = metric(proc, "volley_batch_releases_total", version="1", reason="drain")
        refused = {p: metric(proc, "volley_requests_total", protocol=p, outcome="unavailable")
                   for p in ("http", "grpc")}  # fmt: skip
        wait_for_a_queue(proc, "1")
        client.unload_model(MODEL)  # returns once version 1 has answered its queue
        drains = metric(proc, "volley_batch_releases_total", version="1", reason="drain") - drained
        load.each_client_has(1, "unavailable")
        add_version(model_dir, 2)
        client.load_model(MODEL)
        client.close()
        load.each_client_has(ANSWERS_PER_PHASE, "2")
        load.stop()
        counted = {p: metric(proc, "volley_requests_total", protocol=p, outcome="unavailable")
                   - refused[p] for p in refused}  # fmt: skip
    counts = check_answers(load, ["1", "unavailable", "2"])
    assert counts["unavailable"] >= CLIENTS
    refusals = [a for answers in load.answers for a in answers if label_of(a) == "unavailable"]
    for answer in refusals:
        assert f"model '{MODEL}' is not ready" in answer.message, answer
    assert drains > 0  # the unload found requests in the queue
    # the server counted exactly the refusals the clients saw, on each protocol
    for protocol, first in (("http", 0), ("grpc", 1)):
        clients = load.answers[first::2]  # even clients speak HTTP, odd ones gRPC
        seen = sum(label_of(a) == "unavailable" for answers in clients for a in answers)
        assert counted[protocol] == seen, (protocol, counted[protocol], seen)
