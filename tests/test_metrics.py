"""Prometheus metrics, scraped for real from the metrics port and the HTTP port."""

from __future__ import annotations

import math
import os
import platform
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess, serving
from metrics_scrape import scrape, total
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


def _infer_http(server, rows: int) -> None:
    body = {"inputs": [{"name": "input", "shape": [rows, 32], "datatype": "FP32",
                        "data": np.zeros((rows, 32)).tolist()}]}  # fmt: skip
    assert requests.post(f"{server.url}/v2/models/mlp/infer", json=body, timeout=10).ok


def test_metrics_follow_the_requests(server):
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    mlp = {"model": "mlp", "version": "2"}
    before = scrape(url)
    _infer_http(server, 3)
    bad = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert (
        requests.post(f"{server.url}/v2/models/mlp/infer", json=bad, timeout=10).status_code == 400
    )
    client = grpcclient.InferenceServerClient(server.grpc)
    inp = grpcclient.InferInput("input", [2, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 32), np.float32))
    client.infer("mlp", [inp])
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **mlp, **labels) - total(before, name, **mlp, **labels)

    assert delta("volley_requests_total", protocol="http", outcome="success") == 1
    assert delta("volley_requests_total", protocol="http", outcome="invalid") == 1
    assert delta("volley_requests_total", protocol="grpc", outcome="success") == 1
    assert delta("volley_inferences_total") == 5
    assert delta("volley_executions_total") == 2
    for hist in ("request_duration", "queue_duration", "compute_input_duration",
                 "compute_infer_duration", "compute_output_duration"):  # fmt: skip
        assert delta(f"volley_{hist}_seconds_count") >= 2
        assert delta(f"volley_{hist}_seconds_sum") > 0
    assert delta("volley_batch_size_sum") == 5
    assert total(after, "volley_model_ready", **mlp) == 1
    assert total(after, "volley_model_load_duration_seconds", **mlp) > 0
    assert ("volley_queue_depth", frozenset(mlp.items())) in after
    assert any(name == "volley_inflight_requests" for name, _ in after)
    assert total(after, "volley_batch_releases_total", **mlp) == total(
        after, "volley_executions_total", **mlp
    )


def test_requests_refused_before_a_model_are_counted(server):
    """Malformed bodies, bodies over the JSON limit and undecodable gRPC requests never reach a
    model, yet each is counted by protocol and outcome; a made-up model name mints no series."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = scrape(url)
    infer = f"{server.url}/v2/models/mlp/infer"
    assert requests.post(infer, data=b"{not json", timeout=10).status_code == 400
    too_big = b" " * (16 * 2**20 + 1)  # past the default --max-json-bytes
    assert requests.post(infer, data=too_big, timeout=30).status_code == 413
    made_up = f"{server.url}/v2/models/made-up-model-name/infer"
    assert requests.post(made_up, data=b"{not json", timeout=10).status_code == 400
    client = grpcclient.InferenceServerClient(server.grpc)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(b"\0" * 7)  # not 128 bytes
    with pytest.raises(grpc.RpcError) as info:
        client._client_stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.close()
    after = scrape(url)

    def delta(**labels: str) -> float:
        name = "volley_requests_total"
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta(model="mlp", version="", protocol="http", outcome="invalid") == 2
    assert delta(model="", version="", protocol="http", outcome="invalid") == 1
    assert delta(model="mlp", version="", protocol="grpc", outcome="invalid") == 1
    assert not any("made-up" in str(labels) for _, labels in after)


def test_metrics_on_http_port_and_exposition_format(server):
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert "# TYPE volley_requests_total counter" in text
    assert "# TYPE volley_request_duration_seconds histogram" in text
    assert "_created" not in text
    unknown = requests.get(f"http://127.0.0.1:{server.metrics_port}/nope", timeout=10)
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_process_and_python_metrics_describe_the_server_process(server):
    """prometheus-client's process, platform and GC collectors, about the server's process."""
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    with open(f"/proc/{server.proc.pid}/stat") as stat:  # field 24: resident pages
        rss = int(stat.read().rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
    scraped_rss = total(samples, "process_resident_memory_bytes")
    assert 0.5 * rss < scraped_rss < 2 * rss, (scraped_rss, rss)  # the server's, not ours
    started = total(samples, "process_start_time_seconds")
    assert time.time() - 3600 < started <= time.time()
    assert total(samples, "process_cpu_seconds_total") > 0
    assert total(samples, "process_open_fds") > 0
    (info,) = [dict(labels) for name, labels in samples if name == "python_info"]
    assert info["version"] == platform.python_version()
    assert total(samples, "python_gc_collections_total") >= 0
    assert any(name == "python_gc_objects_collected_total" for name, _ in samples)


# --- every outcome, provoked for real; histogram buckets ----------------------------------------

TIMEOUT = 60  # seconds, per request and per wait: the machine is shared
SLOW_WIDTH = 512
# The boundaries docs/metrics.md documents (50 µs to 10 s in 1-2.5-5 steps; powers of two up
# to 1024).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, math.inf)
HISTOGRAMS = {
    "volley_request_duration_seconds": LATENCY_BUCKETS,
    "volley_queue_duration_seconds": LATENCY_BUCKETS,
    "volley_compute_input_duration_seconds": LATENCY_BUCKETS,
    "volley_compute_infer_duration_seconds": LATENCY_BUCKETS,
    "volley_compute_output_duration_seconds": LATENCY_BUCKETS,
    "volley_batch_size": BATCH_BUCKETS,
}
HTTP_OUTCOMES = {200: "success", 429: "queue_full", 504: "timeout", 503: "unavailable",
                 500: "failed"}  # fmt: skip
GRPC_OUTCOMES = {
    "StatusCode.RESOURCE_EXHAUSTED": "queue_full",
    "StatusCode.DEADLINE_EXCEEDED": "timeout",
    "StatusCode.UNAVAILABLE": "unavailable",
    "StatusCode.INTERNAL": "failed",
}


def fragile(path: Path) -> Path:
    """FP32 [B, n] + a constant [3]: serves n = 1 or 3, fails at run time for any other n."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.arange(3, dtype=np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=onnx_models.OPSET)
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    """A server whose models can be made to refuse or fail: slow (one at a time, a queue of 2,
    ~0.5 s a request, so the queue fills even on a busy machine), fragile (fails at run time),
    spare (to unload) and mlp."""
    root = tmp_path_factory.mktemp("outcomes") / "models"
    onnx_models.slow(root / "slow" / "1" / "model.onnx", iterations=100000)
    onnx_models.write_config(
        root / "slow",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 2}, "intra_op_threads": 1},
    )
    fragile(root / "fragile" / "1" / "model.onnx")
    onnx_models.write_config(root / "fragile", {"max_batch_size": 4})
    for name in ("mlp", "spare"):
        onnx_models.mlp(root / name / "1" / "model.onnx", hidden=32)
        onnx_models.write_config(root / name, {"max_batch_size": 8, "dynamic_batching": {}})
    with serving(root) as proc:
        yield proc


def http_infer(proc: VolleyProcess, model: str, x: np.ndarray, **parameters: int) -> int:
    """One HTTP request; its status code."""
    name = "input" if model in ("mlp", "spare") else "x"
    body: dict = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                              "data": x.ravel().tolist()}]}  # fmt: skip
    if parameters:
        body["parameters"] = parameters
    url = f"{proc.url}/v2/models/{model}/infer"
    return requests.post(url, json=body, timeout=TIMEOUT).status_code


def grpc_infer(proc: VolleyProcess, model: str, x: np.ndarray, timeout_us: int = 0) -> str:
    """One gRPC request; its status ('StatusCode.OK' for an answer)."""
    client = grpcclient.InferenceServerClient(proc.grpc)
    tensor = grpcclient.InferInput("input" if model in ("mlp", "spare") else "x", list(x.shape),
                                   "FP32")  # fmt: skip
    tensor.set_data_from_numpy(x)
    try:
        client.infer(model, [tensor], timeout=timeout_us or None)
    except InferenceServerException as exc:
        return str(exc.status())
    finally:
        client.close()
    return "StatusCode.OK"


def queue_full(samples: dict, held: list[Future]) -> bool:
    """slow's queue (max_queue_size 2, one instance) is full: two requests wait, or three HTTP
    requests are in the server (one runs, so two wait), or one of the `held` requests was refused
    because all three reached the queue before the first had left it to run."""
    return (
        total(samples, "volley_queue_depth", model="slow") >= 2
        or total(samples, "volley_inflight_requests", protocol="http") >= 3
        or any(f.done() and f.result() == 429 for f in held)
    )


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Outcomes:
    """What the clients saw, as (model, protocol, outcome) counts."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str, str]] = Counter()

    def http(self, model: str, status: int) -> None:
        self.seen[model, "http", HTTP_OUTCOMES[status]] += 1

    def grpc(self, model: str, status: str) -> None:
        self.seen[model, "grpc", GRPC_OUTCOMES.get(status, "success")] += 1
        assert status in GRPC_OUTCOMES or status == "StatusCode.OK", status


def test_every_outcome_is_counted_once(busy: VolleyProcess) -> None:
    """queue_full, timeout, unavailable and failed provoked for real, on HTTP, gRPC and a gRPC
    stream: each counter moves by exactly the number of requests that ended so."""
    url = busy.url + "/metrics"
    slow_x = np.full((1, SLOW_WIDTH), 0.1, np.float32)
    mlp_x = np.zeros((1, 32), np.float32)
    seen = Outcomes()
    before = scrape(url)

    # queue_full: one slow request running, two queued; the next ones are turned away (each
    # request's outcome is counted as it comes, so the test holds whichever of them is refused)
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(http_infer, busy, "slow", slow_x) for _ in range(3)]
        try:
            wait_for(lambda: queue_full(scrape(url), held), "a full queue")
        except AssertionError as exc:  # say what the server and the three requests were doing
            samples = scrape(url)
            depth = total(samples, "volley_queue_depth", model="slow")
            inflight = total(samples, "volley_inflight_requests", protocol="http")
            states = [f.result() if f.done() else "pending" for f in held]
            raise AssertionError(
                f"{exc}: queue depth {depth}, HTTP in flight {inflight}, requests {states}\n"
                f"{busy.log()[-4000:]}"
            ) from None
        seen.http("slow", http_infer(busy, "slow", slow_x))
        seen.grpc("slow", grpc_infer(busy, "slow", slow_x))
        for future in held:
            seen.http("slow", future.result(TIMEOUT))

    # timeout: requests with a 1 ms queue timeout behind one that runs for a while
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(http_infer, busy, "slow", slow_x)
        wait_for(
            lambda: total(scrape(url), "volley_inflight_requests", protocol="http") >= 1,
            "the slow request to start",
        )
        seen.http("slow", http_infer(busy, "slow", slow_x, timeout=1000))
        seen.grpc("slow", grpc_infer(busy, "slow", slow_x, timeout_us=1000))
        seen.http("slow", running.result(TIMEOUT))

    # failed: the model raises at run time
    seen.http("fragile", http_infer(busy, "fragile", np.ones((1, 4), np.float32)))
    seen.grpc("fragile", grpc_infer(busy, "fragile", np.ones((1, 4), np.float32)))

    # unavailable: an unloaded model; and a gRPC stream with successes and one refusal
    requests.post(
        busy.url + "/v2/repository/models/spare/unload", timeout=TIMEOUT
    ).raise_for_status()
    seen.http("spare", http_infer(busy, "spare", mlp_x))
    seen.grpc("spare", grpc_infer(busy, "spare", mlp_x))
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(busy.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensor = grpcclient.InferInput("input", [1, 32], "FP32")
    tensor.set_data_from_numpy(mlp_x)
    for model in ("mlp", "mlp", "mlp", "spare"):
        client.async_stream_infer(model, [tensor], request_id=model)
    streamed = [answers.get(timeout=TIMEOUT) for _ in range(4)]
    client.stop_stream()
    client.close()
    errors = [str(error) for _, error in streamed if error is not None]
    assert len(errors) == 1 and "model 'spare' is not ready" in errors[0], errors
    seen.seen["mlp", "grpc_stream", "success"] += 3
    seen.seen["spare", "grpc_stream", "unavailable"] += 1
    after = scrape(url)

    def delta(**labels: str) -> float:
        return total(after, "volley_requests_total", **labels) - total(
            before, "volley_requests_total", **labels
        )

    kinds = {outcome for _, _, outcome in seen.seen}
    assert kinds == {"success", "queue_full", "timeout", "failed", "unavailable"}, seen.seen
    assert {protocol for _, protocol, _ in seen.seen} == {"http", "grpc", "grpc_stream"}
    for (model, protocol, outcome), count in seen.seen.items():
        moved = delta(model=model, protocol=protocol, outcome=outcome)
        assert moved == count, (model, protocol, outcome, moved, count)
    assert delta() == sum(seen.seen.values()), "requests counted that nobody sent"


def buckets(samples: dict, name: str, **labels: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound (`le`), for one label set."""
    out = {}
    for (sample, label_set), value in samples.items():
        found = dict(label_set)
        if sample == f"{name}_bucket" and all(found.get(k) == v for k, v in labels.items()):
            out[float(found["le"])] = value
    return out


def test_histograms_are_cumulative_with_the_documented_buckets(busy: VolleyProcess) -> None:
    url = busy.url + "/metrics"
    mlp = {"model": "mlp", "version": "1"}
    slow = {"model": "slow", "version": "1"}
    before = scrape(url)
    slowest = 0.0
    for rows in (1, 2, 3):  # one request at a time: batches of 1, 2 and 3 rows
        started = time.perf_counter()
        assert http_infer(busy, "mlp", np.zeros((rows, 32), np.float32)) == 200
        slowest = max(slowest, time.perf_counter() - started)
    assert http_infer(busy, "slow", np.full((1, SLOW_WIDTH), 0.2, np.float32)) == 200
    after = scrape(url)

    for name, bounds in HISTOGRAMS.items():
        for labels in (mlp, slow):
            counts = buckets(after, name, **labels)
            assert tuple(sorted(counts)) == bounds, (name, counts)
            values = [counts[b] for b in bounds]
            assert values == sorted(values), f"{name} buckets are not cumulative: {values}"
            assert counts[math.inf] == total(after, f"{name}_count", **labels), name

    def moved(name: str, labels: dict[str, str]) -> dict[float, float]:
        now, then = buckets(after, name, **labels), buckets(before, name, **labels)
        return {b: now[b] - then.get(b, 0.0) for b in now}

    # each mlp request took at most `slowest` seconds end to end, so every one of them is in
    # the first bucket that bound reaches; the slow one took far more than 10 ms
    within = min(b for b in LATENCY_BUCKETS if b >= slowest)
    assert moved("volley_request_duration_seconds", mlp)[within] == 3
    assert moved("volley_request_duration_seconds", mlp)[math.inf] == 3
    slow_moved = moved("volley_request_duration_seconds", slow)
    assert slow_moved[0.01] == 0 and slow_moved[math.inf] == 1, slow_moved
    assert moved("volley_compute_infer_duration_seconds", slow)[0.01] == 0
    sizes = moved("volley_batch_size", mlp)
    assert (sizes[1], sizes[2], sizes[4], sizes[math.inf]) == (1, 2, 3, 3), sizes


def test_buffered_histogram_publishes_what_observe_would_have() -> None:
    """The hot path's histograms (plain counts, added at scrape time) must expose exactly what
    prometheus_client's own `observe` does, bounds included, and nothing twice."""
    from prometheus_client import CollectorRegistry, Histogram

    from server.metrics import LATENCY_BUCKETS, BufferedHistogram

    registry = CollectorRegistry()
    direct = Histogram("direct", "", buckets=LATENCY_BUCKETS, registry=registry)
    buffered = Histogram("buffered", "", buckets=LATENCY_BUCKETS, registry=registry)
    fast = BufferedHistogram(buffered)
    rng = np.random.default_rng(7)
    values = [*LATENCY_BUCKETS, 0.0, 1e-9, 11.0, 1e6, *rng.exponential(0.01, 500).tolist()]

    def samples(name: str) -> dict:
        return {(s.name.replace(name, ""), s.labels.get("le")): s.value
                for s in registry.collect() if s.name == name for s in s.samples}  # fmt: skip

    for round_ in range(2):  # a second publish adds only what came after the first
        for value in values:
            direct.observe(value)
            fast.observe(value)
        fast.publish()
        fast.publish()
        got, want = samples("buffered"), samples("direct")
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (round_, key)
        assert want[("_count", None)] == (round_ + 1) * len(values)


def test_gpu_readings_carry_volley_and_triton_names() -> None:
    """perf_analyzer's --collect-metrics reads Triton's nv_gpu_* names: each NVML reading is
    exported under both. NVML stands in for two GPUs here (the GPU tests scrape a real one);
    the second reports no power, and only that gauge is left out for it."""
    from types import SimpleNamespace

    import pynvml
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import GpuCollector

    def power(handle: int) -> int:
        if handle == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 71_500  # milliwatts

    nvml = SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        nvmlDeviceGetUUID=lambda handle: f"GPU-{handle}".encode(),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=100 + handle, total=1000),
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=40 + handle),
        nvmlDeviceGetPowerUsage=power,
    )
    collector = GpuCollector.__new__(GpuCollector)
    collector._nvml, collector._handles = nvml, [0, 1]
    registry = CollectorRegistry()
    registry.register(collector)
    values = {
        (sample.name, sample.labels["gpu_uuid"]): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    pairs = [("volley_gpu_utilization_ratio", "nv_gpu_utilization"),
             ("volley_gpu_memory_used_bytes", "nv_gpu_memory_used_bytes"),
             ("volley_gpu_memory_total_bytes", "nv_gpu_memory_total_bytes")]  # fmt: skip
    for volley, triton in pairs:
        for gpu in ("GPU-0", "GPU-1"):
            assert values[(volley, gpu)] == values[(triton, gpu)]
    assert values[("nv_gpu_utilization", "GPU-1")] == pytest.approx(0.41)
    assert values[("nv_gpu_memory_used_bytes", "GPU-1")] == 101
    assert values[("nv_gpu_power_usage", "GPU-0")] == values[("volley_gpu_power_watts", "GPU-0")]
    assert values[("nv_gpu_power_usage", "GPU-0")] == pytest.approx(71.5)
    assert ("nv_gpu_power_usage", "GPU-1") not in values
