"""Every queue is bounded: past its bound a request is refused at once (429 /
RESOURCE_EXHAUSTED with a message), never queued without limit."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx_models
import orjson
import requests
import yaml
from conftest import ROOT, copy_shipped_models, serving

TIMEOUT = 60
IMAGE = (ROOT / "docs" / "samples" / "street-1.jpg").read_bytes()


def test_a_detection_pipeline_bounds_requests_in_progress(tmp_path: Path) -> None:
    """`max_queue_size: 1` on the detect pipeline: of 8 simultaneous images, the ones that
    arrive while another is in progress get 429 at once; the rest are answered."""
    root = copy_shipped_models(tmp_path)
    config_file = root / "detect" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "max_queue_size": 1}))
    with serving(root, "--metrics-port", "0") as proc:
        url = proc.url + "/v2/models/detect/infer"
        header = orjson.dumps(
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                         "parameters": {"binary_data_size": 4 + len(IMAGE)}}]}
        )  # fmt: skip
        body = header + struct.pack("<I", len(IMAGE)) + IMAGE

        def detect(_: int) -> requests.Response:
            headers = {"inference-header-content-length": str(len(header))}
            return requests.post(url, data=body, headers=headers, timeout=TIMEOUT)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(detect, range(8)))
        codes = sorted(r.status_code for r in replies)
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
        refused = next(r for r in replies if r.status_code == 429)
        assert "requests in progress (max_queue_size 1)" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        metadata = requests.get(proc.url + "/v2/models/detect/config", timeout=TIMEOUT).json()
        assert metadata["parameters"]["max_queue_size"] == {"string_value": "1"}


def test_an_unbounded_queue_cannot_be_configured(tmp_path: Path) -> None:
    """Triton's `max_queue_size: 0` (unbounded) is refused in config.yaml, naming the field."""
    root = tmp_path / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", hidden=16)
    onnx_models.write_config(
        root / "mlp", {"max_batch_size": 8, "dynamic_batching": {"max_queue_size": 0}}
    )
    with serving(root, "--metrics-port", "0", "--no-strict-readiness") as proc:
        index = requests.post(proc.url + "/v2/repository/index", timeout=TIMEOUT).json()
        (row,) = index
        assert row["state"] == "UNAVAILABLE"
        assert "max_queue_size" in row["reason"] and "greater than or equal to 1" in row["reason"]
