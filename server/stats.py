"""Per-model-version statistics: one aggregator feeds both `/v2/.../stats` and Prometheus."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Protocol

from server import metrics
from server.metrics import BufferedHistogram


@dataclass
class Duration:
    """A Triton `StatisticDuration`: how many, and their summed nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    """Compute durations of the batches of one size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class Queue(Protocol):
    """What counts toward a version's `volley_queue_depth` (its batchers)."""

    @property
    def queued(self) -> int:
        """Requests waiting now."""


class ModelStats:
    """Counters and durations of one model version, in Triton's statistics shape.

    Its histograms and queue depth are plain numbers on the hot path, published to Prometheus
    before each scrape (`publish`, see `metrics.refresh`); counters are updated at once.
    """

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchDurations] = {}
        labels = (model, version)
        self._inferences = metrics.INFERENCES.labels(*labels)
        self._executions = metrics.EXECUTIONS.labels(*labels)
        self._request_seconds = BufferedHistogram(metrics.REQUEST_DURATION.labels(*labels))
        self._queue_seconds = BufferedHistogram(metrics.QUEUE_DURATION.labels(*labels))
        self._input_seconds = BufferedHistogram(metrics.COMPUTE_INPUT_DURATION.labels(*labels))
        self._infer_seconds = BufferedHistogram(metrics.COMPUTE_INFER_DURATION.labels(*labels))
        self._output_seconds = BufferedHistogram(metrics.COMPUTE_OUTPUT_DURATION.labels(*labels))
        self._batch_size = BufferedHistogram(metrics.BATCH_SIZE.labels(*labels))
        self._stages = {
            stage: BufferedHistogram(metrics.PIPELINE_STAGE_DURATION.labels(*labels, stage))
            for stage in ("decode", "inference", "nms")
        }
        self._histograms = (
            self._request_seconds, self._queue_seconds, self._input_seconds,
            self._infer_seconds, self._output_seconds, self._batch_size, *self._stages.values(),
        )  # fmt: skip
        self._queue_depth = metrics.QUEUE_DEPTH.labels(*labels)
        self._queues: weakref.WeakSet[Queue] = weakref.WeakSet()
        self.ready = metrics.MODEL_READY.labels(*labels)
        self.load_seconds = metrics.MODEL_LOAD_DURATION.labels(*labels)
        metrics.refresh_on_scrape(self.publish)
        self._releases = {
            reason: metrics.BATCH_RELEASES.labels(*labels, reason)
            for reason in ("full", "preferred", "delay", "immediate", "drain", "inline")
        }

    def count_queue(self, queue: Queue) -> None:
        """Count `queue`'s waiting requests in this version's queue depth (held weakly)."""
        self._queues.add(queue)

    def publish(self) -> None:
        """Bring the Prometheus series up to date (before a scrape, and once retired)."""
        for histogram in self._histograms:
            histogram.publish()
        self._queue_depth.set(sum(queue.queued for queue in self._queues))

    def record_batch(
        self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int, reason: str
    ) -> None:
        """One executed batch of `rows` rows from `requests` requests."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        # Triton charges each request the compute time of the batch it ran in.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        per_size = self.batches.setdefault(rows, BatchDurations())
        per_size.compute_input.add(input_ns)
        per_size.compute_infer.add(infer_ns)
        per_size.compute_output.add(output_ns)
        self._executions.inc()
        self._inferences.inc(rows)
        self._batch_size.observe(rows)
        self._input_seconds.observe(input_ns / 1e9)
        self._infer_seconds.observe(infer_ns / 1e9)
        self._output_seconds.observe(output_ns / 1e9)
        self._releases[reason].inc()

    def record_pipeline(
        self, images: int, decode_ns: int, queue_ns: int, infer_ns: int, nms_ns: int
    ) -> None:
        """One pipeline request: decode, the wrapped model (its queue wait and batch), NMS.

        In the v2 statistics decode is compute_input, the wrapped model's time compute_infer,
        NMS compute_output; the wrapped model's queue wait is also the pipeline's queue.
        """
        self.execution_count += 1
        self.inference_count += images
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(decode_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(nms_ns)
        self.queue.add(queue_ns)
        self._executions.inc()
        self._inferences.inc(images)
        self._queue_seconds.observe(queue_ns / 1e9)
        self._stages["decode"].observe(decode_ns / 1e9)
        self._stages["inference"].observe(infer_ns / 1e9)
        self._stages["nms"].observe(nms_ns / 1e9)

    def record_queue(self, ns: int) -> None:
        """Time one request waited before its batch started."""
        self.queue.add(ns)
        self._queue_seconds.observe(ns / 1e9)

    def record_success(self, ns: int) -> None:
        """A request answered with outputs, `ns` after it reached the batcher."""
        self.success.add(ns)
        self._request_seconds.observe(ns / 1e9)

    def record_failure(self, ns: int) -> None:
        """A request that reached the batcher and failed there (timeout, execution error)."""
        self.fail.add(ns)

    def as_dict(self) -> dict:
        """The v2 statistics extension's `model_stats` entry."""
        return {
            "name": self.model,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": Duration().as_dict(),
                "cache_miss": Duration().as_dict(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": d.compute_input.as_dict(),
                    "compute_infer": d.compute_infer.as_dict(),
                    "compute_output": d.compute_output.as_dict(),
                }
                for size, d in sorted(self.batches.items())
            ],
        }


def merge_stats(parts: list[list[dict]]) -> list[dict]:
    """The `model_stats` entries of several worker processes as one server's: counts and
    durations summed per (model, version), batch statistics per batch size, the latest
    `last_inference`; entries in the order they first appear."""
    merged: dict[tuple[str, str], dict] = {}
    for part in parts:
        for entry in part:
            key = (entry["name"], entry["version"])
            merged[key] = _add(merged[key], entry) if key in merged else entry
    return list(merged.values())


def _add(a: dict, b: dict) -> dict:
    out = {}
    for key, value in a.items():
        if key == "last_inference":
            out[key] = max(value, b[key])
        elif key == "batch_stats":
            sizes = {entry["batch_size"]: entry for entry in value}
            for entry in b[key]:
                size = entry["batch_size"]
                sizes[size] = _add(sizes[size], entry) if size in sizes else entry
            out[key] = [sizes[size] for size in sorted(sizes)]
        elif isinstance(value, dict):
            out[key] = _add(value, b[key])
        elif isinstance(value, int) and key != "batch_size":
            out[key] = value + b[key]
        else:
            out[key] = value
    return out
