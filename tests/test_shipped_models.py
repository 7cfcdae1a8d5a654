"""The shipped model repository (`models/`) served by Volley, as a user would call it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import ROOT, VolleyProcess
from reference import ON_GPU, assert_close, ort_outputs

from training.detector.coco import load_coco
from training.detector.evaluate import coco_map, images_to_input
from training.detector.parity import detection_difference
from training.detector.synth import write_synthetic_coco
from training.fraud.features import RAW_NAMES, raw_columns
from training.fraud.simulate import SimConfig, simulate

SHIPPED = ROOT / "models"
FRAUD_WINDOW = SimConfig(n_customers=300, n_terminals=600, n_days=60)
DETECTOR_IMAGES = 24
DETECTOR_BATCH = 8
SERVED_MAP50_FLOOR = 0.8  # chance is ~0; the full held-out figure is in the model card


def test_both_shipped_models_load_ready(shipped: VolleyProcess) -> None:
    client = httpclient.InferenceServerClient(shipped.http)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert {name: index[name]["state"] for name in ("fraud", "detector")} == {
        "fraud": "READY",
        "detector": "READY",
    }
    detector = client.get_model_metadata("detector")
    assert detector["inputs"] == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 3, 320, 320]}
    ]
    assert detector["outputs"] == [
        {"name": "detections", "datatype": "FP32", "shape": [-1, 100, 6]}
    ]
    client.close()


def test_shipped_fraud_model_over_grpc(shipped: VolleyProcess) -> None:
    tx = simulate(FRAUD_WINDOW, seed=21)  # transactions no training run has seen
    features = raw_columns(tx)  # raw columns: the graph derives its other features itself
    client = grpcclient.InferenceServerClient(shipped.grpc)
    config = client.get_model_config("fraud", as_json=True)["config"]
    assert config["parameters"]["feature_names"]["string_value"].split(",") == list(RAW_NAMES)
    threshold = np.float32(config["parameters"]["threshold"]["string_value"])
    scores, decisions = [], []
    for start in range(0, len(features), 512):
        chunk = features[start : start + 512]
        request = grpcclient.InferInput("features", list(chunk.shape), "FP32")
        request.set_data_from_numpy(chunk)
        result = client.infer("fraud", [request])
        scores.append(result.as_numpy("score"))
        decisions.append(result.as_numpy("is_fraud"))
    client.close()
    score, is_fraud = np.concatenate(scores), np.concatenate(decisions)
    assert_close(
        score, ort_outputs(SHIPPED / "fraud" / "1" / "model.onnx", {"features": features})["score"]
    )
    if not ON_GPU:  # on a GPU a score within rounding of the threshold may fall either side
        assert np.array_equal(is_fraud, score >= threshold)
    flagged = is_fraud.ravel()
    assert tx.label.sum() > 0 and flagged.any()
    assert tx.label[flagged].mean() > 10 * tx.label.mean()


def test_shipped_detector_finds_the_objects_over_http(
    shipped: VolleyProcess, tmp_path: Path
) -> None:
    data = load_coco(write_synthetic_coco(tmp_path, DETECTOR_IMAGES, seed=77, split="test"), 320)
    images = images_to_input(data.images)
    client = httpclient.InferenceServerClient(shipped.http)
    served = []
    for start in range(0, len(images), DETECTOR_BATCH):
        batch = images[start : start + DETECTOR_BATCH]
        request = httpclient.InferInput("images", list(batch.shape), "FP32")
        request.set_data_from_numpy(batch, binary_data=True)
        output = httpclient.InferRequestedOutput("detections", binary_data=True)
        served.append(client.infer("detector", [request], outputs=[output]).as_numpy("detections"))
    client.close()
    detections = np.concatenate(served)
    local = ort_outputs(SHIPPED / "detector" / "1" / "model.onnx", {"images": images})
    assert detection_difference(detections, local["detections"]) <= (2e-3 if ON_GPU else 1e-4)
    quality = coco_map(data, detections)
    assert quality["map50"] >= SERVED_MAP50_FLOOR, quality
