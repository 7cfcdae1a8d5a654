"""The batcher on its own: real ONNX Runtime instances, no server around it.

Events are ordered with the batcher's `hold_until_queued` hook and a `Gate` that holds runs
inside the instance, never with sleeps; every answer is checked against ONNX Runtime run
directly on that request's own rows.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_models
import pytest
from reference import assert_close, ort_outputs

from server import metrics
from server.batcher import INLINE_MIN_RUNS, Batcher
from server.config import ConfigError, build_config
from server.cpus import WORKERS_ENV, machine_cpus
from server.errors import ErrorKind, VolleyError
from server.held import HELD
from server.runtime import OnnxInstance, load_instances
from server.stats import ModelStats

WAIT = 10.0  # seconds: only a broken batcher ever waits this long


class Gate:
    """Shared by the wrapped instances of one batcher: records the rows of each run as it
    starts and, while closed, holds every run before it computes."""

    def __init__(self, closed: bool) -> None:
        self.rows: list[int] = []
        self.threads: list[int] = []  # the thread each run happened on
        self.solo: list[bool] = []  # whether each run took the solo session
        self._open = not closed
        self._cond = threading.Condition()
        self._loop_thread = threading.get_ident()  # made by a test, on the event loop's thread

    def enter(self, rows: int, solo: bool = False) -> None:
        with self._cond:
            if not self._open and threading.get_ident() == self._loop_thread:
                raise AssertionError("a run on the event loop came to a closed gate (deadlock)")
            self.rows.append(rows)
            self.threads.append(threading.get_ident())
            self.solo.append(solo)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open)

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False

    async def started(self, count: int) -> None:
        """Wait, off the event loop, until `count` runs have started."""

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.rows) >= count, WAIT)

        assert await asyncio.to_thread(wait), f"{len(self.rows)} of {count} runs started"


class GatedInstance:
    """A real instance whose runs pass through a `Gate` first."""

    def __init__(self, instance: OnnxInstance, gate: Gate) -> None:
        self.instance = instance
        self.gate = gate
        self.provider = instance.provider
        self.index = instance.index
        self.solo = instance.solo

    def gather(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        return self.instance.gather(name, parts)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.enter(next(iter(inputs.values())).shape[0], self.solo)
        return self.instance.run(inputs)


Make = Callable[..., tuple[Batcher, Gate, Path]]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """Build a batcher over a real model; every gate is opened at teardown."""
    gates: list[Gate] = []

    def build(builder, config: dict, closed: bool = False) -> tuple[Batcher, Gate, Path]:
        model_dir = tmp_path / "m"
        model_file = builder(model_dir / "1" / "model.onnx")
        onnx_models.write_config(model_dir, {"warmup": {"count": 0}, **config})
        cfg = build_config(model_dir, model_file)
        gate = Gate(closed)
        gates.append(gate)
        instances = [GatedInstance(i, gate) for i in load_instances(model_file, cfg)]
        stats = ModelStats(f"batcher-{tmp_path.name}", "1")  # own metric labels per test
        return Batcher(cfg, instances, stats), gate, model_file

    yield build
    for gate in gates:
        gate.open()


def rows(seed: int, count: int, features: int = 32) -> np.ndarray:
    """Distinct random rows: any mix-up of rows inside or across requests changes answers."""
    return np.random.default_rng(seed).standard_normal((count, features)).astype(np.float32)


def releases(batcher: Batcher, reason: str) -> float:
    """Batches this batcher released for `reason` (volley_batch_releases_total)."""
    labels = {"model": batcher.stats.model, "version": "1", "reason": reason}
    return metrics.REGISTRY.get_sample_value("volley_batch_releases_total", labels) or 0.0


async def until_queued(batcher: Batcher, count: int) -> None:
    """Yield to the event loop until `count` requests are queued (tasks enqueue on first step)."""
    for _ in range(1000):
        if batcher.queued >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{batcher.queued} of {count} requests queued")


async def test_each_request_gets_its_own_rows_back(make: Make) -> None:
    config = {"max_batch_size": 8, "dynamic_batching": {}}
    batcher, gate, model = make(onnx_models.mlp, config)
    xs = [rows(i, n) for i, n in enumerate([3, 1, 2, 3, 2, 1, 4])]
    batcher.hold_until_queued(len(xs))
    outs = await asyncio.gather(*(batcher.infer({"input": x}, len(x)) for x in xs))
    for x, got in zip(xs, outs, strict=True):
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])
    # In arrival order while the rows fit in 8: [3, 1, 2] [3, 2, 1] [4].
    assert gate.rows == [6, 6, 4]
    assert releases(batcher, "immediate") == 3
    await batcher.drain()


async def test_instance_count_runs_batches_in_parallel(make: Make) -> None:
    config = {"max_batch_size": 1, "dynamic_batching": {}, "instance_count": 2,
              "intra_op_threads": 1}  # fmt: skip
    batcher, gate, model = make(onnx_models.mlp, config, closed=True)
    xs = [rows(i, 1) for i in range(4)]
    pending = [asyncio.ensure_future(batcher.infer({"input": x}, 1)) for x in xs]
    await gate.started(2)  # both instances are inside a run at once
    assert gate.rows == [1, 1]
    gate.open()
    for x, got in zip(xs, await asyncio.gather(*pending), strict=True):
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])
    await batcher.drain()


async def test_a_batch_alone_takes_the_solo_session_and_batches_together_do_not(
    make: Make,
) -> None:
    """`solo_session`: a batch that starts while no other runs takes the spare session with all
    the usable CPUs' threads; one that starts beside a running batch takes its own instance,
    so two batches never share the solo session."""
    config = {"max_batch_size": 1, "dynamic_batching": {}, "instance_count": 2,
              "intra_op_threads": 1, "solo_session": True}  # fmt: skip
    batcher, gate, model = make(onnx_models.mlp, config, closed=True)
    xs = [rows(i, 1) for i in range(3)]
    first = asyncio.ensure_future(batcher.infer({"input": xs[0]}, 1))
    await gate.started(1)
    assert gate.solo == [True]  # alone: the solo session
    rest = [asyncio.ensure_future(batcher.infer({"input": x}, 1)) for x in xs[1:]]
    await gate.started(2)
    assert gate.solo == [True, False]  # beside the solo batch: an instance of its own
    gate.open()
    for x, got in zip(xs, await asyncio.gather(first, *rest), strict=True):
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])
    assert len(gate.solo) == 3
    gate.close()
    alone = asyncio.ensure_future(batcher.infer({"input": xs[0]}, 1))
    await gate.started(4)
    assert gate.solo[3] is True  # idle again: the next batch runs alone
    gate.open()
    await alone
    await batcher.drain()


@pytest.mark.parametrize("workers", [1, 2])
def test_solo_session_is_a_spare_session_on_every_usable_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """The solo session has a thread per CPU the process may use, also in one of `--workers N`
    (whose instances get its share): a lone image is as fast as with one process."""
    monkeypatch.setenv(WORKERS_ENV, str(workers))
    model_dir = tmp_path / "m"
    model_file = onnx_models.mlp(model_dir / "1" / "model.onnx")
    onnx_models.write_config(model_dir, {"instance_count": 2, "intra_op_threads": 1,
                                         "solo_session": True})  # fmt: skip
    instances = load_instances(model_file, build_config(model_dir, model_file))
    assert [(i.solo, i.threads) for i in instances] == [(False, 1), (False, 1),
                                                         (True, machine_cpus())]  # fmt: skip
    onnx_models.write_config(model_dir, {"solo_session": True})
    with pytest.raises(ConfigError, match="solo_session.*instance_count >= 2"):
        build_config(model_dir, model_file)


async def test_delay_lets_a_batch_grow(make: Make) -> None:
    """Three requests arriving together run as one batch, released once the oldest has waited
    `max_queue_delay_us` (a lower bound is the promise; nothing waits on an upper one)."""
    delay_s = 0.3
    config = {"max_batch_size": 16, "dynamic_batching": {"max_queue_delay_us": int(delay_s * 1e6)}}
    batcher, gate, model = make(onnx_models.mlp, config)
    xs = [rows(i, 1) for i in range(3)]
    start = time.perf_counter()
    outs = await asyncio.gather(*(batcher.infer({"input": x}, 1) for x in xs))
    assert time.perf_counter() - start >= delay_s
    assert gate.rows == [3]
    assert releases(batcher, "delay") == 1
    assert batcher.stats.as_dict()["execution_count"] == 1
    for x, got in zip(xs, outs, strict=True):
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])
    await batcher.drain()


async def test_preferred_batch_size_is_released_at_once(make: Make) -> None:
    """With a delay far longer than the test, a batch reaching a preferred size runs at once."""
    batching = {"max_queue_delay_us": 60_000_000, "preferred_batch_sizes": [4]}
    config = {"max_batch_size": 8, "dynamic_batching": batching}
    batcher, gate, model = make(onnx_models.mlp, config)
    xs = [rows(i, 2) for i in range(2)]
    batcher.hold_until_queued(2)
    outs = await asyncio.wait_for(
        asyncio.gather(*(batcher.infer({"input": x}, 2) for x in xs)), WAIT
    )
    assert gate.rows == [4]
    assert releases(batcher, "preferred") == 1
    for x, got in zip(xs, outs, strict=True):
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])
    await batcher.drain()


async def test_queue_full_and_timeout(make: Make) -> None:
    config = {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 1}}
    batcher, gate, model = make(onnx_models.mlp, config, closed=True)
    x = rows(0, 1)
    running = asyncio.ensure_future(batcher.infer({"input": x}, 1))
    await gate.started(1)  # the first request is executing, the queue is empty
    queued = asyncio.ensure_future(batcher.infer({"input": rows(1, 1)}, 1, timeout_us=1000))
    await until_queued(batcher, 1)
    with pytest.raises(VolleyError) as err:
        await asyncio.wait_for(batcher.infer({"input": rows(2, 1)}, 1), WAIT)
    assert err.value.kind is ErrorKind.QUEUE_FULL
    with pytest.raises(VolleyError) as err:
        await asyncio.wait_for(queued, WAIT)
    assert err.value.kind is ErrorKind.TIMEOUT
    assert batcher.queued == 0
    gate.open()
    assert_close((await running)["score"], ort_outputs(model, {"input": x})["score"])
    assert gate.rows == [1]
    await batcher.drain()


async def test_default_timeout_applies_when_the_request_gives_none(make: Make) -> None:
    """`default_timeout_us` fails a request that gives no timeout while it queues."""
    config = {"max_batch_size": 1, "dynamic_batching": {"default_timeout_us": 1000}}
    batcher, gate, model = make(onnx_models.mlp, config, closed=True)
    x = rows(0, 1)
    # Its own timeout, long enough that it surely starts; it then holds the only instance.
    running = asyncio.ensure_future(batcher.infer({"input": x}, 1, timeout_us=60_000_000))
    await gate.started(1)
    queued = asyncio.ensure_future(batcher.infer({"input": rows(1, 1)}, 1))
    with pytest.raises(VolleyError) as err:
        await asyncio.wait_for(queued, WAIT)
    assert err.value.kind is ErrorKind.TIMEOUT
    assert "timed out after 1000 us" in err.value.message
    gate.open()
    assert_close((await running)["score"], ort_outputs(model, {"input": x})["score"])
    await batcher.drain()


async def test_a_failing_batch_fails_each_request_with_a_request_id(make: Make) -> None:
    """Each request of a batch ONNX Runtime fails gets a clean error naming the request id the
    log has the details under, never ONNX Runtime's own text."""
    config = {"max_batch_size": 4, "dynamic_batching": {}}
    batcher, gate, model = make(onnx_models.mlp, config)
    bad = np.zeros((1, 7), dtype=np.float32)  # passes the batcher, fails inside ORT
    batcher.hold_until_queued(2)
    both = [batcher.infer({"input": bad}, 1) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(*both, return_exceptions=True), WAIT)
    assert gate.rows == [2]  # one batch, both of its requests failed
    assert all(isinstance(r, VolleyError) and r.kind is ErrorKind.INTERNAL for r in results)
    messages = {r.message for r in results}
    assert len(messages) == 1, messages  # one batch, one id
    (message,) = messages
    assert re.fullmatch(
        r"model 'm' failed on this batch \(request id [0-9a-f]{12}; the server log has the "
        r"details\)",
        message,
    ), message
    assert "ONNXRuntimeError" not in message and "dimensions" not in message
    x = rows(0, 1)
    good = await batcher.infer({"input": x}, 1)
    assert_close(good["score"], ort_outputs(model, {"input": x})["score"])
    await batcher.drain()


async def test_drain_answers_queued_requests_at_once_then_refuses(make: Make) -> None:
    """Requests waiting for a batch that would wait a minute are run by the drain at once."""
    config = {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 60_000_000}}
    batcher, gate, model = make(onnx_models.mlp, config)
    xs = [rows(i, 1 + i) for i in range(3)]
    pending = [asyncio.ensure_future(batcher.infer({"input": x}, len(x))) for x in xs]
    await until_queued(batcher, 3)
    await asyncio.wait_for(batcher.drain(), WAIT)
    assert gate.rows == [6]
    assert releases(batcher, "drain") == 1
    for x, task in zip(xs, pending, strict=True):
        assert_close(task.result()["score"], ort_outputs(model, {"input": x})["score"])
    with pytest.raises(VolleyError) as err:
        await batcher.infer({"input": xs[0]}, 1)
    assert err.value.kind is ErrorKind.UNAVAILABLE


# A limit far above a one-row mlp run on a busy machine (the default, 200 us, was passed on a
# slow CI box): these tests check the rule, not the machine's speed.
INLINE = {"max_batch_size": 8, "inline_max_us": 5000}


async def lone_requests(batcher: Batcher, model: Path, count: int) -> None:
    """`count` one-row requests one after the other, each answer checked."""
    for seed in range(count):
        x = rows(100 + seed, 1)
        got = await batcher.infer({"input": x}, 1)
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])


async def test_a_lone_request_to_an_idle_fast_model_runs_on_the_loop(make: Make) -> None:
    """Once its one-row runs are measured fast, a lone one-row request to an idle batcher runs
    on the event loop's own thread (no hand-off); the first ones ran on the instance thread."""
    batcher, gate, model = make(onnx_models.mlp, {**INLINE, "dynamic_batching": {}})
    await lone_requests(batcher, model, INLINE_MIN_RUNS + 4)
    loop_thread = threading.get_ident()
    assert loop_thread not in gate.threads[:INLINE_MIN_RUNS]
    assert gate.threads[INLINE_MIN_RUNS:] == [loop_thread] * 4
    assert releases(batcher, "inline") == 4
    assert releases(batcher, "immediate") == INLINE_MIN_RUNS
    await batcher.drain()


async def test_a_request_beside_a_running_batch_is_queued_not_inlined(make: Make) -> None:
    """While a batch runs on the instance, a new one-row request waits in the queue as the rule
    says, and is batched on the instance thread."""
    batcher, gate, model = make(onnx_models.mlp, {"max_batch_size": 8, "dynamic_batching": {}})
    await lone_requests(batcher, model, INLINE_MIN_RUNS)
    gate.close()
    wide = asyncio.ensure_future(batcher.infer({"input": rows(1, 2)}, 2))  # two rows: never inline
    await gate.started(INLINE_MIN_RUNS + 1)
    lone = asyncio.ensure_future(batcher.infer({"input": rows(2, 1)}, 1))
    await until_queued(batcher, 1)
    gate.open()
    for x, task in ((rows(1, 2), wide), (rows(2, 1), lone)):
        assert_close((await task)["score"], ort_outputs(model, {"input": x})["score"])
    assert threading.get_ident() not in gate.threads
    assert releases(batcher, "inline") == 0
    await batcher.drain()


async def concurrent_rows(batcher: Batcher, model: Path, count: int) -> None:
    """`count` one-row requests made in one loop pass and held as a transport holds what it
    read (`HELD`), each answer checked."""
    xs = [rows(200 + i, 1) for i in range(count)]
    tasks = [asyncio.ensure_future(batcher.infer({"input": x}, 1)) for x in xs]
    for task in tasks:
        HELD.hold(task)
    for x, got in zip(xs, await asyncio.gather(*tasks), strict=True):
        assert_close(got["score"], ort_outputs(model, {"input": x})["score"])


INLINE_BATCHES = {**INLINE, "dynamic_batching": {}, "inline_batches": True}


async def test_inline_batches_run_what_one_loop_pass_read_as_batches_on_the_loop(
    make: Make,
) -> None:
    """With `inline_batches`, requests read together run on the loop's own thread as batches of
    up to `max_batch_size` rows (one per loop pass), waking no instance thread."""
    batcher, gate, model = make(onnx_models.mlp, INLINE_BATCHES)
    await lone_requests(batcher, model, INLINE_MIN_RUNS)
    await concurrent_rows(batcher, model, 11)
    assert gate.rows[INLINE_MIN_RUNS:] == [8, 3]
    assert gate.threads[INLINE_MIN_RUNS:] == [threading.get_ident()] * 2
    assert releases(batcher, "inline") == 2
    await batcher.drain()


async def test_without_inline_batches_requests_read_together_batch_on_the_thread(
    make: Make,
) -> None:
    batcher, gate, model = make(onnx_models.mlp, {"max_batch_size": 8, "dynamic_batching": {}})
    await lone_requests(batcher, model, INLINE_MIN_RUNS)
    await concurrent_rows(batcher, model, 11)
    assert sum(gate.rows[INLINE_MIN_RUNS:]) == 11
    assert threading.get_ident() not in gate.threads
    assert releases(batcher, "inline") == 0
    await batcher.drain()


async def test_inline_batches_leave_the_queue_to_a_thread_running_a_batch(make: Make) -> None:
    """While an instance thread runs a batch (one with a queue timeout keeps the threads' rule),
    requests queue for that thread even with `inline_batches`: the loop never takes them, so
    it never waits behind, or beside, a run it did not start."""
    batcher, gate, model = make(onnx_models.mlp, INLINE_BATCHES)
    await lone_requests(batcher, model, INLINE_MIN_RUNS)
    gate.close()
    timed = asyncio.ensure_future(batcher.infer({"input": rows(1, 2)}, 2, timeout_us=10**7))
    await gate.started(INLINE_MIN_RUNS + 1)
    xs = [rows(2 + i, 1) for i in range(3)]
    tasks = [asyncio.ensure_future(batcher.infer({"input": x}, 1)) for x in xs]
    for task in tasks:
        HELD.hold(task)
    await until_queued(batcher, 3)
    for _ in range(10):  # loop passes: nothing may take the queue while the thread runs
        await asyncio.sleep(0)
    assert batcher.queued == 3
    gate.open()
    assert_close((await timed)["score"], ort_outputs(model, {"input": rows(1, 2)})["score"])
    for x, task in zip(xs, tasks, strict=True):
        assert_close((await task)["score"], ort_outputs(model, {"input": x})["score"])
    assert threading.get_ident() not in gate.threads
    assert gate.rows[INLINE_MIN_RUNS:] == [2, 3]
    await batcher.drain()


@pytest.mark.parametrize(
    "config",
    [
        {"max_batch_size": 8, "dynamic_batching": {}, "inline_max_us": 0},
        {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 100}},
        {"max_batch_size": 8, "dynamic_batching": {}, "inline_max_us": 1},  # slower than 1 us
    ],
    ids=["turned off", "queue delay", "model too slow"],
)
async def test_no_inline_run_when_off_delayed_or_too_slow(make: Make, config: dict) -> None:
    batcher, gate, model = make(onnx_models.mlp, config)
    await lone_requests(batcher, model, INLINE_MIN_RUNS + 4)
    assert threading.get_ident() not in gate.threads
    assert releases(batcher, "inline") == 0
    await batcher.drain()
