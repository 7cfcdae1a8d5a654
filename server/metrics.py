"""Every Prometheus metric Volley exports, in one place, on one registry.

Names follow Prometheus conventions: `volley_` prefix, base units (seconds, bytes), `_total`
counters. Per-model series carry `model` and `version` labels. The registry also carries
prometheus-client's process and runtime metrics (`process_*`, `python_*`).

With `volley serve --workers N` every worker writes its values to prometheus_client's
multiprocess directory (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor) and any worker's
scrape reads all of them: counters and histograms are summed over the workers (those of a worker
that died included), gauges as their `multiprocess_mode` says (over the live workers), and
`process_*` is the sum over the supervisor and the workers (`ServerProcessCollector`).
`python_gc_*` is left out there: it would describe one worker only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from server.cpus import worker_processes

log = logging.getLogger(__name__)
disable_created_metrics()

# Where the metrics below live; in a single process also what a scrape shows.
REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROCESS = worker_processes() > 1
PIDS_FILE = "pids"  # in the multiprocess directory: the supervisor's and its workers' pids
if not MULTIPROCESS:
    # Memory, CPU time, open files and start time of the process (`process_*`, Linux only), and
    # the interpreter's version and garbage collections (`python_*`).
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)
    GCCollector(registry=REGISTRY)
MODEL = ("model", "version")

# Latency buckets from 50 µs to 10 s in 1-2.5-5 steps: the fraud model answers in well under a
# millisecond, the detector in milliseconds, and a queue under overload in seconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter(
    "volley_requests",
    "Inference requests answered, by protocol and outcome "
    "(success, invalid, not_found, queue_full, rate_limited, timeout, unavailable, failed, "
    "unauthenticated, forbidden), also those refused before reaching a model.",
    (*MODEL, "protocol", "outcome"),
    registry=REGISTRY,
)
INFERENCES = Counter(
    "volley_inferences", "Rows inferred (a request with batch n counts n).", MODEL,
    registry=REGISTRY,
)  # fmt: skip
EXECUTIONS = Counter(
    "volley_executions", "Model executions (batches run); inferences/executions = mean batch.",
    MODEL, registry=REGISTRY,
)  # fmt: skip
BATCH_RELEASES = Counter(
    "volley_batch_releases",
    "Why each batch was released: full, preferred, delay (max_queue_delay_us passed), "
    "immediate (no delay configured), drain (shutting down), inline (a lone request run on the "
    "event loop).",
    (*MODEL, "reason"),
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "volley_request_duration_seconds",
    "Time from a request's arrival at the batcher to its outputs, per successful request.",
    MODEL, buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
QUEUE_DURATION = Histogram(
    "volley_queue_duration_seconds", "Time a request waited in the queue before its batch ran.",
    MODEL, buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
COMPUTE_INPUT_DURATION = Histogram(
    "volley_compute_input_duration_seconds", "Time to assemble a batch's inputs, per batch.",
    MODEL, buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
COMPUTE_INFER_DURATION = Histogram(
    "volley_compute_infer_duration_seconds", "Time the model ran, per batch.",
    MODEL, buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
COMPUTE_OUTPUT_DURATION = Histogram(
    "volley_compute_output_duration_seconds",
    "Time to split a batch's outputs back to its requests, per batch.",
    MODEL, buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
BATCH_SIZE = Histogram(
    "volley_batch_size", "Rows per executed batch.", MODEL, buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)  # fmt: skip
QUEUE_DEPTH = Gauge(
    "volley_queue_depth", "Requests waiting in the model's queue now.", MODEL, registry=REGISTRY,
    multiprocess_mode="livesum",
)  # fmt: skip
INFLIGHT = Gauge(
    "volley_inflight_requests", "Inference requests being handled now, by protocol.",
    ("protocol",), registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
MODEL_READY = Gauge(
    "volley_model_ready",
    "1 while the model version serves requests (with --workers: in every worker), else 0.",
    MODEL, registry=REGISTRY, multiprocess_mode="livemin",
)  # fmt: skip
MODEL_LOAD_DURATION = Gauge(
    "volley_model_load_duration_seconds", "Time the last load of the version took (with warmup).",
    MODEL, registry=REGISTRY, multiprocess_mode="livemax",
)  # fmt: skip
PIPELINE_STAGE_DURATION = Histogram(
    "volley_pipeline_stage_duration_seconds",
    "Time a pipeline request spent in each stage: decode (image decode and letterbox, off the "
    "event loop), inference (the wrapped model: queue and batch), nms (boxes, off the loop).",
    (*MODEL, "stage"), buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
FRAMES = Counter(
    "volley_frames",
    "Stream frames answered, by outcome: processed, skipped (replaced by a newer frame or too "
    "old), failed.",
    ("model", "outcome"), registry=REGISTRY,
)  # fmt: skip
FRAME_AGE = Histogram(
    "volley_frame_age_seconds",
    "Age of a stream frame when its inference batch started (since it reached the server).",
    ("model",), buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
FRAME_LATENCY = Histogram(
    "volley_frame_latency_seconds",
    "Server time of a processed stream frame, from its arrival to its answer.",
    ("model",), buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
DECODER_FAILURES = Counter(
    "volley_decoder_failures",
    "Decoder processes of a pipeline (decode_processes) that died under a job and were replaced.",
    ("model",), registry=REGISTRY,
)  # fmt: skip
ACTIVE_STREAMS = Gauge(
    "volley_active_streams", "Open camera streams (gRPC or WebSocket), per model.", ("model",),
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip


class GpuCollector(Collector):
    """GPU utilisation and memory through NVML, read at scrape time; absent without a GPU."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
        ]

    def collect(self):  # noqa: D102 - prometheus_client protocol
        nvml = self._nvml
        # Volley's names, and Triton's for the same readings (perf_analyzer's --collect-metrics
        # reads those: nv_gpu_utilization, nv_gpu_memory_*_bytes, nv_gpu_power_usage).
        families = {
            key: [GaugeMetricFamily(name, text, labels=["gpu_uuid"]) for name in names]
            for key, names, text in (
                ("util", ("volley_gpu_utilization_ratio", "nv_gpu_utilization"),
                 "GPU busy fraction over the last sample period."),
                ("used", ("volley_gpu_memory_used_bytes", "nv_gpu_memory_used_bytes"),
                 "GPU memory in use."),
                ("total", ("volley_gpu_memory_total_bytes", "nv_gpu_memory_total_bytes"),
                 "GPU memory in all."),
                ("power", ("volley_gpu_power_watts", "nv_gpu_power_usage"),
                 "GPU power draw in watts."),
            )
        }  # fmt: skip
        for handle in self._handles:
            uuid = nvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            readings = {
                "util": nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                "used": float(memory.used),
                "total": float(memory.total),
            }
            with contextlib.suppress(nvml.NVMLError):  # not every GPU reports its power
                readings["power"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
            for key, value in readings.items():
                for family in families[key]:
                    family.add_metric([uuid], value)
        for group in families.values():
            yield from (family for family in group if family.samples)


def enable_gpu_metrics() -> bool:
    """Register the NVML collector if a GPU and its driver are present."""
    try:
        collector = GpuCollector()
    except Exception as exc:  # no driver, no library, no device: all mean "no GPU metrics"
        log.info("gpu metrics off", extra={"event": "gpu_metrics", "reason": str(exc)})
        return False
    if not collector._handles:
        return False
    EXPOSED.register(collector)
    log.info("gpu metrics on", extra={"event": "gpu_metrics", "gpus": len(collector._handles)})
    return True


class ServerProcessCollector(Collector):
    """`process_*` of the whole server with --workers N: CPU time, memory and open files summed
    over the supervisor and its workers (the pids it lists in `pids_file`), the start time the
    supervisor's, the file limit the least."""

    def __init__(self, pids_file: Path) -> None:
        self._pids_file = pids_file

    def collect(self):  # noqa: D102 - prometheus_client protocol
        try:
            pids = orjson.loads(self._pids_file.read_bytes())
        except (OSError, ValueError):
            pids = [os.getpid()]
        totals = {}
        for pid in pids:
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                if family.name not in totals:
                    totals[family.name] = family
                    continue
                total, value = totals[family.name].samples, family.samples[0].value
                combine = min if family.name.endswith(("start_time_seconds", "max_fds")) else sum
                total[0] = total[0]._replace(value=combine((total[0].value, value)))
        yield from totals.values()


def _exposed_registry() -> CollectorRegistry:
    """What a scrape shows: this process's registry, or with --workers N every worker's."""
    if not MULTIPROCESS:
        return REGISTRY
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    exposed = CollectorRegistry()
    MultiProcessCollector(exposed, directory)
    exposed.register(ServerProcessCollector(Path(directory) / PIDS_FILE))
    PlatformCollector(registry=exposed)
    return exposed


EXPOSED = _exposed_registry()


# Values kept as plain numbers on the hot path, published by these bound methods: before each
# scrape, and with --workers N also every REFRESH_SECONDS in each worker (a scrape reads the other
# workers' values from their files). Held weakly: a retired model version's go with it.
_refreshers: list[weakref.WeakMethod] = []
REFRESH_SECONDS = 1.0


def refresh_on_scrape(publish: Callable[[], None]) -> None:
    """Have the bound method `publish` publish its values before each scrape (see above)."""
    _refreshers.append(weakref.WeakMethod(publish))


def refresh() -> None:
    """Publish every value kept as a plain number."""
    alive = []
    for ref in _refreshers:
        publish = ref()
        if publish is not None:
            publish()
            alive.append(ref)
    _refreshers[:] = alive


class BufferedHistogram:
    """One histogram series observed at the cost of a list increment, for the hot path.

    Observations are tallied here and added to the Prometheus series by `publish` (before each
    scrape, see `refresh`): a scrape shows exactly what a `Histogram.observe` per value would
    have, without its two locked updates per value. Observe and publish on one thread (the
    event loop). The series' bounds and values are prometheus_client internals (unchanged since
    0.4), read here so that a change fails the first model load, not a scrape.
    """

    __slots__ = ("_bounds", "_bucket_values", "_sum_value", "_counts", "_sum")

    def __init__(self, series: Histogram) -> None:
        self._bounds = tuple(series._upper_bounds)  # ascending, +Inf last
        self._bucket_values = series._buckets  # one value per bucket (not cumulative)
        self._sum_value = series._sum
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose upper bound is at least `value`."""
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def publish(self) -> None:
        """Add what was observed since the last publish to the Prometheus series."""
        counts, self._counts = self._counts, [0] * len(self._bounds)
        if not any(counts):
            return
        for value, count in zip(self._bucket_values, counts, strict=True):
            if count:
                value.inc(count)
        self._sum_value.inc(self._sum)
        self._sum = 0.0


class BufferedCounter:
    """One counter series incremented at the cost of an integer addition (as `BufferedHistogram`:
    added to the Prometheus series before each scrape; increment and publish on one thread)."""

    __slots__ = ("_series", "_count", "__weakref__")

    def __init__(self, series: Counter) -> None:
        self._series = series
        self._count = 0
        refresh_on_scrape(self.publish)

    def inc(self) -> None:
        """Count one."""
        self._count += 1

    def publish(self) -> None:
        """Add what was counted since the last publish to the Prometheus series."""
        if self._count:
            count, self._count = self._count, 0
            self._series.inc(count)


def hot_counter(series: Counter) -> Counter | BufferedCounter:
    """`series`, to be incremented on the hot path: buffered in a single process; with
    --workers, the series itself, so that a scrape of any worker counts every worker's
    increments exactly (buffered ones would reach the others' scrapes up to a second late)."""
    return BufferedCounter(series) if worker_processes() == 1 else series


async def refresh_forever() -> None:
    """Publish them every REFRESH_SECONDS (a worker's part, with --workers N)."""
    while True:
        refresh()
        await asyncio.sleep(REFRESH_SECONDS)


def exposition() -> bytes:
    """The current metrics in Prometheus text format."""
    refresh()
    return generate_latest(EXPOSED)
