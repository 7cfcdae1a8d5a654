"""Prometheus metrics, scraped for real from the metrics port and the HTTP port."""

from __future__ import annotations

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from metrics_scrape import scrape, total


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


def test_metrics_on_http_port_and_exposition_format(server):
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert "# TYPE volley_requests_total counter" in text
    assert "# TYPE volley_request_duration_seconds histogram" in text
    assert "_created" not in text
    unknown = requests.get(f"http://127.0.0.1:{server.metrics_port}/nope", timeout=10)
    assert unknown.status_code == 404 and "error" in unknown.json()
