"""The CUDA path: runs only where onnxruntime-gpu sees a GPU (skipped on CPU-only machines)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess, build_repository
from metrics_scrape import scrape, total
from reference import assert_close, ort_outputs

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu and a GPU",
)


def test_models_run_on_cuda_and_match_cpu(tmp_path):
    repository = build_repository(tmp_path / "models")
    server = VolleyProcess(repository)
    try:
        server.wait_models()
        events = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        providers = {e["model"]: e["provider"] for e in events if e.get("event") == "model_loaded"}
        assert providers["mlp"] == "CUDAExecutionProvider", providers
        config = requests.get(f"{server.url}/v2/models/mlp/config", timeout=5).json()
        assert config["instance_group"][0]["kind"] == "KIND_GPU"

        client = grpcclient.InferenceServerClient(server.grpc)
        x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
        inp = grpcclient.InferInput("input", [16, 32], "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("mlp", [inp]).as_numpy("score")
        want = ort_outputs(repository / "mlp" / "2" / "model.onnx", {"input": x})["score"]
        assert_close(got, want)

        samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
        assert total(samples, "volley_gpu_memory_total_bytes") > 0
        assert total(samples, "volley_gpu_memory_used_bytes") > 0
        assert any(name == "volley_gpu_utilization_ratio" for name, _ in samples)
    finally:
        assert server.stop() == 0
