"""The batcher on its own: real ONNX Runtime instances, no server around it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import onnx_models
import pytest
from reference import assert_close

from server.batcher import Batcher
from server.config import build_config
from server.errors import ErrorKind, VolleyError
from server.runtime import load_instances
from server.stats import ModelStats


class SpanRecorder:
    """Wraps a real instance and records when each run starts and ends."""

    def __init__(self, instance, spans: list) -> None:
        self.instance = instance
        self.spans = spans
        self.provider = instance.provider
        self.index = instance.index
        self._lock = threading.Lock()

    def run(self, inputs):
        start = time.perf_counter()
        out = self.instance.run(inputs)
        with self._lock:
            self.spans.append((start, time.perf_counter(), next(iter(inputs.values())).shape[0]))
        return out


def _make(tmp_path: Path, builder, config: dict, spans: list | None = None) -> Batcher:
    model_dir = tmp_path / "m"
    model_file = builder(model_dir / "1" / "model.onnx")
    onnx_models.write_config(model_dir, config)
    cfg = build_config(model_dir, model_file)
    instances = load_instances(model_file, cfg)
    if spans is not None:
        instances = [SpanRecorder(i, spans) for i in instances]
    return Batcher(cfg, instances, ModelStats("m", "1"))


async def test_instance_count_runs_batches_in_parallel(tmp_path):
    spans: list = []
    config = {"max_batch_size": 1, "dynamic_batching": {}, "instance_count": 2,
              "intra_op_threads": 1, "warmup": {"count": 0}}  # fmt: skip
    batcher = _make(tmp_path, onnx_models.slow, config, spans)
    x = np.zeros((1, 512), dtype=np.float32)
    await asyncio.gather(*(batcher.infer({"x": x}, 1) for _ in range(4)))
    spans.sort()
    overlaps = sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])
    assert overlaps >= 1, spans
    await batcher.drain()


async def test_batches_respect_max_rows_and_keep_order(tmp_path):
    spans: list = []
    config = {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 50000},
              "warmup": {"count": 0}}  # fmt: skip
    batcher = _make(tmp_path, onnx_models.mlp, config, spans)
    xs = [np.full((3, 32), i, dtype=np.float32) for i in range(6)]
    outs = await asyncio.gather(*(batcher.infer({"input": x}, 3) for x in xs))
    assert all(s[2] <= 8 for s in spans)
    assert sum(s[2] for s in spans) == 18
    assert len(spans) == 3  # 6 requests of 3 rows: two per batch of at most 8
    reference = [await batcher.infer({"input": x}, 3) for x in xs]
    for got, want in zip(outs, reference, strict=True):
        assert_close(got["score"], want["score"])
    await batcher.drain()


async def test_delay_lets_a_batch_grow(tmp_path):
    spans: list = []
    config = {"max_batch_size": 16, "dynamic_batching": {"max_queue_delay_us": 100000},
              "warmup": {"count": 0}}  # fmt: skip
    batcher = _make(tmp_path, onnx_models.mlp, config, spans)
    x = np.zeros((1, 32), dtype=np.float32)

    async def late(delay: float):
        await asyncio.sleep(delay)
        return await batcher.infer({"input": x}, 1)

    await asyncio.gather(late(0), late(0.02), late(0.04))
    assert [s[2] for s in spans] == [3]
    assert batcher.stats.as_dict()["execution_count"] == 1
    await batcher.drain()


async def test_queue_full_and_timeout(tmp_path):
    config = {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 1},
              "intra_op_threads": 1, "warmup": {"count": 0}}  # fmt: skip
    batcher = _make(tmp_path, onnx_models.slow, config)
    x = np.zeros((1, 512), dtype=np.float32)
    running = asyncio.ensure_future(batcher.infer({"x": x}, 1))
    await asyncio.sleep(0.01)  # the first request is now executing, the queue is empty
    queued = asyncio.ensure_future(batcher.infer({"x": x}, 1, timeout_us=1000))
    await asyncio.sleep(0)
    with pytest.raises(VolleyError) as err:
        await batcher.infer({"x": x}, 1)
    assert err.value.kind is ErrorKind.QUEUE_FULL
    with pytest.raises(VolleyError) as err:
        await queued
    assert err.value.kind is ErrorKind.TIMEOUT
    assert (await running)["y"].shape == (1, 512)
    assert batcher.queued == 0
    await batcher.drain()


async def test_a_failing_batch_fails_each_request_with_the_reason(tmp_path):
    config = {"max_batch_size": 4, "dynamic_batching": {"max_queue_delay_us": 20000},
              "warmup": {"count": 0}}  # fmt: skip
    batcher = _make(tmp_path, onnx_models.mlp, config)
    bad = np.zeros((1, 7), dtype=np.float32)  # passes the batcher, fails inside ORT
    results = await asyncio.gather(
        batcher.infer({"input": bad}, 1), batcher.infer({"input": bad}, 1), return_exceptions=True
    )
    assert all(isinstance(r, VolleyError) and r.kind is ErrorKind.INTERNAL for r in results)
    assert all("inference failed" in r.message for r in results)
    good = await batcher.infer({"input": np.zeros((1, 32), np.float32)}, 1)
    assert good["score"].shape == (1, 1)
    await batcher.drain()


async def test_drain_answers_queued_requests_then_refuses(tmp_path):
    config = {"max_batch_size": 1, "dynamic_batching": {}, "intra_op_threads": 1,
              "warmup": {"count": 0}}  # fmt: skip
    batcher = _make(tmp_path, onnx_models.slow, config)
    x = np.zeros((1, 512), dtype=np.float32)
    pending = [asyncio.ensure_future(batcher.infer({"x": x}, 1)) for _ in range(3)]
    await asyncio.sleep(0)
    await batcher.drain()
    assert all(p.done() and p.result()["y"].shape == (1, 512) for p in pending)
    with pytest.raises(VolleyError) as err:
        await batcher.infer({"x": x}, 1)
    assert err.value.kind is ErrorKind.UNAVAILABLE
