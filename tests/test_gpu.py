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


def test_staged_instance_pins_its_buffers_and_matches_the_cpu():
    from pathlib import Path

    from server.config import build_config
    from server.runtime import OnnxInstance

    folder = Path(__file__).resolve().parents[1] / "models" / "detector"
    model_file = folder / "1" / "model.onnx"
    instance = OnnxInstance(model_file, build_config(folder, model_file), 0)
    assert instance.provider == "CUDAExecutionProvider" and instance.staged
    from vision_scenes import scene_image

    scenes = [scene_image(seed, (320, 320), 1.0).image for seed in range(8)]
    images = np.stack(scenes).transpose(0, 3, 1, 2).astype(np.float32) / 255
    got = instance.run({"images": instance.gather("images", [images[:3], images[3:]])})
    assert instance.pinned, "staging buffers should be page-locked on a GPU"
    want = ort_outputs(model_file, {"images": images})
    for mine, cpu in zip(got["detections"], want["detections"], strict=True):
        # Confident detections agree; the order of near-equal weak ones may differ by kernel.
        mine, cpu = (rows[rows[:, 4] > 0.5] for rows in (mine, cpu))
        mine, cpu = (rows[np.lexsort(rows[:, :2].T)] for rows in (mine, cpu))
        assert len(mine) == len(cpu) > 0
        # Boxes are in 320x320 pixels: TF32 convolutions move them by hundredths of a pixel.
        np.testing.assert_allclose(mine[:, :4], cpu[:, :4], atol=0.1)
        np.testing.assert_allclose(mine[:, 4:], cpu[:, 4:], atol=1e-3)


def test_detect_pipeline_sends_uint8_images_to_the_gpu(tmp_path):
    from conftest import copy_shipped_models, serving
    from vision_scenes import encode, matched_fraction, scene_image

    scenes = [scene_image(seed, (320, 240), 2.0) for seed in range(8)]
    with serving(copy_shipped_models(tmp_path)) as server:
        client = grpcclient.InferenceServerClient(server.grpc)
        tensor = grpcclient.InferInput("images", [len(scenes)], "BYTES")
        tensor.set_data_from_numpy(np.array([encode(s.image) for s in scenes], dtype=np.object_))
        result = client.infer("detect", [tensor])
        counts, boxes = result.as_numpy("num_detections"), result.as_numpy("boxes")
        ids = result.as_numpy("class_ids")
        found = [matched_fraction(s, boxes[i, : counts[i]], ids[i, : counts[i]])
                 for i, s in enumerate(scenes)]  # fmt: skip
        assert np.mean(found) >= 0.85, found
        client.close()
        events = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        variants = [e for e in events if e.get("event") == "uint8_variant_loaded"]
        assert variants and variants[0]["provider"] == "CUDAExecutionProvider", variants
        assert variants[0]["staged"] is True and variants[0]["padded"] is True
