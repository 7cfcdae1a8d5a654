"""`volley serve --switch-interval-ms`: the GIL switch interval of every server process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("switch") / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    onnx_models.write_config(root / "mlp", {"max_batch_size": 8})
    return root


def listening_intervals(proc: VolleyProcess) -> list[float]:
    """The switch interval each serving process says it runs with, once it listens."""
    events = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    return [e["switch_interval_ms"] for e in events if e.get("event") == "listening"]


def infer_once(proc: VolleyProcess) -> None:
    client = httpclient.InferenceServerClient(proc.http)
    features = httpclient.InferInput("input", [1, 32], "FP32")
    features.set_data_from_numpy(np.ones((1, 32), np.float32))
    assert client.infer("mlp", [features]).as_numpy("score").shape[0] == 1
    client.close()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), [5.0]),
        (("--switch-interval-ms", "0.5"), [0.5]),
        (("--switch-interval-ms", "1", "--workers", "2"), [1.0, 1.0]),
    ],  # fmt: skip
)
def test_every_serving_process_runs_with_the_interval_asked_for(repository, flags, expected):
    with serving(repository, *flags) as proc:
        infer_once(proc)
        assert listening_intervals(proc) == expected


def test_an_interval_out_of_range_is_refused(repository: Path) -> None:
    for value in ("0", "0.01", "500", "fast"):
        proc = VolleyProcess(repository, "--switch-interval-ms", value)
        assert proc.proc.wait(30) == 2
        proc.stop()
        assert "--switch-interval-ms" in proc.log() and "0.05 to 100 milliseconds" in proc.log()
