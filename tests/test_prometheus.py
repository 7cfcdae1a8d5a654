"""A real Prometheus (Debian's `prometheus` package) scrapes a real Volley under a short load;
every dashboard query (deploy/grafana/volley.json) and every alert rule
(deploy/prometheus/volley-rules.yml) is run through Prometheus' HTTP API and must return
series carrying the labels its legend or annotations use.

Left without data on purpose, and said so: the GPU panels on a machine without a GPU (the
NVML collector is not registered, so there are no `volley_gpu_*` series; the queries still
have to parse and run). Alert expressions are conditions (`signal > threshold`): each one's
signal must return data, and the whole condition is checked against what the load did.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
import yaml
from conftest import ROOT, VolleyProcess, copy_shipped_models, free_port, running, serving
from test_decode_processes import decoders
from test_repository import wait_for
from tritonclient.utils import InferenceServerException
from websockets.sync.client import connect

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "volley-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "volley.json"
SAMPLES = ROOT / "docs" / "samples"
JOB = "volley"
WINDOW = "30s"  # stands in for Grafana's $__rate_interval: spans both load phases
TIMEOUT = 60
SLOW_WIDTH = 512


@pytest.fixture(scope="module", autouse=True)
def prometheus_installed() -> None:
    """Debian's prometheus package, which README line 2 (and so CI) installs."""
    for binary in ("prometheus", "promtool"):
        if not shutil.which(binary):
            pytest.fail(
                f"{binary} is missing: install Debian's prometheus (apt-get install prometheus)"
            )


# --- Volley, its load, and Prometheus ---------------------------------------------------------


@pytest.fixture(scope="module")
def volley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    """The shipped models plus `slow` (one request at a time, a queue of 2) to fill a queue,
    and `detect_procs` (`detect` with one decoder process, which the load kills)."""
    repository = copy_shipped_models(tmp_path_factory.mktemp("prometheus"))
    detect = yaml.safe_load((repository / "detect" / "config.yaml").read_text())
    (repository / "detect_procs").mkdir()
    (repository / "detect_procs" / "config.yaml").write_text(
        yaml.safe_dump({**detect, "decode_processes": 1})
    )
    onnx_models.slow(repository / "slow" / "1" / "model.onnx", iterations=30000)
    onnx_models.write_config(
        repository / "slow",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 2}, "intra_op_threads": 1},
    )
    with serving(repository) as proc:
        yield proc


@pytest.fixture(scope="module")
def prometheus(volley: VolleyProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on a free loopback port, scraping Volley's metrics port every second and
    evaluating the shipped rules every second; its base URL."""
    folder = tmp_path_factory.mktemp("prometheus-server")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [
            {"targets": [f"127.0.0.1:{volley.metrics_port}"]}]}],
    }  # fmt: skip
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, (folder / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            try:
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def send_load(volley: VolleyProcess) -> None:
    """One round: fraud over HTTP and gRPC, invalid and unknown-model requests, the detector
    (raw tensor), the detect pipeline (a JPEG, and a WebSocket burst that skips frames), and
    more concurrent requests than `slow` queues (queue_full)."""
    fraud = (SAMPLES / "fraud-request.json").read_bytes()
    for _ in range(5):
        response = requests.post(f"{volley.url}/v2/models/fraud/infer", data=fraud, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
    bad = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert requests.post(f"{volley.url}/v2/models/fraud/infer", json=bad,
                         timeout=TIMEOUT).status_code == 400  # fmt: skip
    assert requests.post(f"{volley.url}/v2/models/nope/infer", json=bad,
                         timeout=TIMEOUT).status_code == 404  # fmt: skip

    client = grpcclient.InferenceServerClient(volley.grpc)
    rows = np.array(json.loads(fraud)["inputs"][0]["data"], np.float32)
    features = grpcclient.InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows)
    for _ in range(5):
        client.infer("fraud", [features])
    images = grpcclient.InferInput("images", [1, 3, 320, 320], "FP32")
    images.set_data_from_numpy(np.full((1, 3, 320, 320), 0.5, np.float32))
    client.infer("detector", [images])
    jpeg = grpcclient.InferInput("images", [1], "BYTES")
    jpeg.set_data_from_numpy(np.array([(SAMPLES / "street-1.jpg").read_bytes()], np.object_))
    assert client.infer("detect", [jpeg]).as_numpy("num_detections")[0] > 0
    killed = decoders(volley.proc.pid)
    for pid in killed:  # the image it gets next fails, and it is replaced
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(map(running, killed)), "the killed decoder", timeout=10)
    with pytest.raises(InferenceServerException, match="decoder process failed"):
        client.infer("detect_procs", [jpeg])
    assert client.infer("detect_procs", [jpeg]).as_numpy("num_detections")[0] > 0
    client.close()

    frames = [(SAMPLES / name).read_bytes() for name in ("street-1.jpg", "street-2.jpg")] * 10
    with connect(f"ws://{volley.http}/v2/models/detect/stream", max_size=None) as ws:
        for frame in frames:  # a burst: frames that wait are replaced by newer ones (skipped)
            ws.send(frame)
        answers = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in frames]
    assert any(a.get("skipped") for a in answers) and any("detections" in a for a in answers)

    body = {"inputs": [{"name": "x", "shape": [1, SLOW_WIDTH], "datatype": "FP32",
                        "data": [0.1] * SLOW_WIDTH}]}  # fmt: skip

    def slow(_: int) -> int:
        return requests.post(f"{volley.url}/v2/models/slow/infer", json=body,
                             timeout=TIMEOUT).status_code  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(slow, range(8)))
    assert 200 in codes and 429 in codes, codes


def query(prometheus: str, expr: str, at: float) -> list[dict]:
    """An instant query; its series (`metric` labels and `value`). Fails on a query error."""
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": expr, "time": at},
                            timeout=TIMEOUT)  # fmt: skip
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    assert body["data"]["resultType"] == "vector", expr
    return body["data"]["result"]


def wait_for_scrapes(prometheus: str, after: float) -> None:
    """Block until Prometheus has scraped Volley at least twice since `after` (a Unix time).
    Its first scrape comes some seconds after start: target discovery applies in batches."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        up = query(prometheus, f'timestamp(up{{job="{JOB}"}})', time.time())
        if up and float(up[0]["value"][1]) > after + 1:
            return
        assert time.monotonic() < deadline, "prometheus does not scrape volley"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def loaded(volley: VolleyProcess, prometheus: str) -> float:
    """Two rounds of load with scrapes before, between and after them (so every rate has a
    rise inside its window); the time to evaluate queries at, after the rules ran too."""
    wait_for_scrapes(prometheus, time.time())
    send_load(volley)
    wait_for_scrapes(prometheus, time.time())
    send_load(volley)
    wait_for_scrapes(prometheus, time.time())
    time.sleep(2)  # rule evaluations (every second) on the last scrapes
    return time.time()


# --- what the dashboard and the rules ask -------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, PromQL with Grafana's variables filled in, legend format) of every query."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", WINDOW)
                    .replace("$job", JOB).replace("$model", ".*"))  # fmt: skip
            assert "$" not in expr, f"unfilled variable in {expr}"
            out.append((panel["title"], expr, target.get("legendFormat", "")))
    return out


def labels_used(template: str) -> set[str]:
    """Labels a legend (`{{model}}`) or an alert annotation (`{{ $labels.model }}`) prints."""
    return set(re.findall(r"{{\s*(?:\$labels\.)?(\w+)\s*}}", template)) - {"value"}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def signal_of(expr: str) -> str:
    """`signal > threshold` -> `signal` (the comparison is the condition, not the data)."""
    found = re.fullmatch(r"(.*\S)\s*(?:>|<|>=|<=|==|!=)\s*[0-9.e+-]+\s*", expr.strip(), re.S)
    assert found, f"alert expression is not `signal <comparison> number`: {expr}"
    return found[1]


GPU_METRIC = re.compile(r"\bvolley_gpu_\w+")


def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    rules = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=TIMEOUT)  # fmt: skip
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = subprocess.run(["promtool", "check", "config", str(PROMETHEUS / "prometheus.yml")],
                            capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    rule = {"alert": "Broken", "expr": "sum by (model) (rate(volley_requests_total[5m])"}
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [rule]}]}))
    result = subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True,
                            text=True, timeout=TIMEOUT)  # fmt: skip
    assert result.returncode != 0


def test_every_dashboard_query_returns_series_with_its_legend_labels(
    prometheus: str, loaded: float
) -> None:
    has_gpu = bool(query(prometheus, "volley_gpu_memory_total_bytes", loaded))
    checked, skipped = 0, []
    for title, expr, legend in dashboard_targets():
        series = query(prometheus, expr, loaded)
        if GPU_METRIC.search(expr) and not has_gpu:
            assert series == [], (title, series)  # parsed and ran; no GPU, so no data
            skipped.append(title)
            continue
        assert series, f"{title}: no data for {expr}"
        values = [float(one["value"][1]) for one in series]
        assert any(math.isfinite(v) for v in values), (title, expr, series)
        # A quantile of a model with no observation in the window is NaN (Grafana leaves a
        # gap: the pipeline has no compute histograms, say); ratios drop such series (`> 0`).
        if "histogram_quantile" not in expr:
            assert not any(math.isnan(v) for v in values), (title, expr, series)
        for one in series:
            assert labels_used(legend) <= one["metric"].keys(), (title, legend, one["metric"])
        checked += 1
    assert checked >= 20 and set(skipped) <= {"GPU utilisation", "GPU memory used"}
    print(f"dashboard: {checked} queries returned data; no GPU, no data: {sorted(set(skipped))}")


def test_dashboard_shows_the_load_by_model_outcome_and_protocol(
    prometheus: str, loaded: float
) -> None:
    """The key panels, value by value: latency quantiles per model, rates by outcome."""
    targets = {(title, legend): expr for title, expr, legend in dashboard_targets()}

    def by(title: str, legend: str, label: str) -> dict[str, float]:
        series = query(prometheus, targets[(title, legend)], loaded)
        return {one["metric"][label]: float(one["value"][1]) for one in series}

    p99 = by("Latency p50 / p95 / p99 by model", "{{model}} p99", "model")
    assert {"fraud", "detector", "slow"} <= p99.keys(), p99
    assert 0 < p99["fraud"] < p99["slow"] <= 10, p99  # slow runs ~100 ms a request
    outcomes = query(prometheus, targets[("Request rate by model and outcome",
                                          "{{model}} {{outcome}}")], loaded)  # fmt: skip
    seen = {(s["metric"]["model"], s["metric"]["outcome"]) for s in outcomes
            if float(s["value"][1]) > 0}  # fmt: skip
    assert {("fraud", "success"), ("fraud", "invalid"), ("(none)", "not_found"),
            ("slow", "success"), ("slow", "queue_full")} <= seen, seen  # fmt: skip
    protocols = by("Request rate by protocol", "{{protocol}}", "protocol")
    assert protocols.get("http", 0) > 0 and protocols.get("grpc", 0) > 0, protocols
    frames = query(prometheus, targets[("Stream frames per second", "{{model}} {{outcome}}")],
                   loaded)  # fmt: skip
    assert {s["metric"]["outcome"] for s in frames if float(s["value"][1]) > 0} >= {
        "processed", "skipped"}  # fmt: skip


def test_every_alert_signal_returns_series_with_its_annotation_labels(
    prometheus: str, loaded: float
) -> None:
    for rule in alert_rules():
        series = query(prometheus, signal_of(rule["expr"]), loaded)
        assert series, f"{rule['alert']}: no data for {signal_of(rule['expr'])}"
        values = [float(one["value"][1]) for one in series]
        assert any(math.isfinite(v) for v in values), (rule["alert"], series)
        if "histogram_quantile" not in rule["expr"]:
            assert not any(math.isnan(v) for v in values), (rule["alert"], series)
        wanted = set().union(*(labels_used(text) for text in rule["annotations"].values()))
        for one in series:
            assert wanted <= one["metric"].keys(), (rule["alert"], wanted, one["metric"])


def test_alert_conditions_match_what_the_load_did(prometheus: str, loaded: float) -> None:
    """Volley is up and every model ready (no condition holds); `slow` turned requests away
    (queue saturated, error ratio high); fraud stayed fast."""
    conditions = {rule["alert"]: rule["expr"] for rule in alert_rules()}

    def holds_for(alert: str) -> set[str]:
        return {s["metric"].get("model", s["metric"].get("instance", ""))
                for s in query(prometheus, conditions[alert], loaded)}  # fmt: skip

    assert holds_for("VolleyDown") == set()
    assert holds_for("VolleyModelNotReady") == set()
    assert holds_for("VolleyQueueSaturated") == {"slow"}
    assert holds_for("VolleyDecodersFailing") == {"detect_procs"}
    assert "slow" in holds_for("VolleyHighErrorRatio")
    assert "fraud" not in holds_for("VolleyHighErrorRatio") | holds_for("VolleyHighP99Latency")


def test_prometheus_evaluates_every_rule_without_error(prometheus: str, loaded: float) -> None:
    body = requests.get(f"{prometheus}/api/v1/rules", timeout=TIMEOUT).json()
    rules: list[dict[str, Any]] = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    alerts = requests.get(f"{prometheus}/api/v1/alerts", timeout=TIMEOUT).json()["data"]["alerts"]
    pending = {(a["labels"]["alertname"], a["labels"].get("model")) for a in alerts}
    assert ("VolleyQueueSaturated", "slow") in pending, alerts


def test_dashboard_is_well_formed_and_names_only_metrics_volley_exports() -> None:
    """Static checks that need no Prometheus: ids, variables, and metric names, including
    the GPU ones that have no data here (a typo there would otherwise pass unseen)."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "model"} <= variables
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    for expr in exprs:
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
        assert used <= variables, (expr, used - variables)
    exprs += [rule["expr"] for rule in alert_rules()]
    source = (ROOT / "server" / "metrics.py").read_text()
    for name in set(re.findall(r"\bvolley_\w+", " ".join(exprs))):
        family = re.sub(r"(_bucket|_sum|_count|_total)$", "", name)
        assert f'"{family}"' in source, f"{name} is not defined in server/metrics.py"
    panels = " ".join(exprs)
    for wanted in ("volley_request_duration_seconds_bucket", "volley_queue_duration_seconds",
                   "volley_compute_infer_duration_seconds", "volley_batch_size_bucket",
                   "volley_queue_depth", "volley_inflight_requests", "volley_frames_total",
                   "volley_gpu_utilization_ratio", "volley_gpu_memory_used_bytes"):  # fmt: skip
        assert wanted in panels, f"the dashboard has no panel on {wanted}"
