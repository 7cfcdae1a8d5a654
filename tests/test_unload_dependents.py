"""Triton's `unload_dependents` (`model_repository(unload_dependents)`): unloading a pipeline
with it also unloads the model it runs, over HTTP and gRPC, in one process and with workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, copy_shipped_models, serving


def states(server: VolleyProcess) -> dict[str, str]:
    index = requests.post(f"{server.url}/v2/repository/index", timeout=10).json()
    return {entry["name"]: entry["state"] for entry in index}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_shipped_models(tmp_path_factory.mktemp("dependents"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unloading_a_pipeline_with_its_dependents(models: Path, workers: str) -> None:
    with serving(models, "--workers", workers) as server:
        http = httpclient.InferenceServerClient(server.http)
        assert "model_repository(unload_dependents)" in http.get_server_metadata()["extensions"]
        http.unload_model("detect")  # without: the detector stays
        assert states(server) == {"detect": "UNAVAILABLE", "detector": "READY", "fraud": "READY"}

        http.load_model("detect")
        http.unload_model("detect", unload_dependents=True)
        assert states(server) == {"detect": "UNAVAILABLE", "detector": "UNAVAILABLE",
                                  "fraud": "READY"}  # fmt: skip

        http.load_model("detector")
        http.load_model("detect")
        with grpcclient.InferenceServerClient(server.grpc) as grpc:
            grpc.unload_model("detect", unload_dependents=True)
            grpc.unload_model("fraud", unload_dependents=True)  # a plain model: itself only
        assert set(states(server).values()) == {"UNAVAILABLE"}
        for _ in range(6):  # new connections: with workers, each may answer
            assert states(server)["detector"] == "UNAVAILABLE"
        http.close()


def test_a_bad_unload_dependents_is_refused(models: Path) -> None:
    with serving(models, "--model-control", "explicit", "--load-model", "fraud") as server:
        answer = requests.post(
            f"{server.url}/v2/repository/models/fraud/unload",
            json={"parameters": {"unload_dependents": "yes"}}, timeout=10,
        )  # fmt: skip
        assert answer.status_code == 400
        assert "'unload_dependents' must be true or false" in answer.json()["error"]
        assert states(server)["fraud"] == "READY"
        url = f"{server.url}/v2/repository/models/fraud/unload"
        listed = requests.post(url, json={"parameters": [1]}, timeout=10)
        assert listed.status_code == 400 and "must be a JSON object" in listed.json()["error"]
        assert states(server)["fraud"] == "READY"
