"""gRPC's standard health checking protocol (`grpc.health.v1.Health/Check`), as Kubernetes gRPC
probes, grpc-health-probe and gRPC load balancers call it. The messages are written and read as
bytes here, from health.proto's field numbers, so the test does not share the server's code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx_models
import pytest
import requests
from conftest import VolleyProcess, serving

CHECK = "/grpc.health.v1.Health/Check"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"  # HealthCheckResponse{status: 1 | 2}
KEY = "health-test-key-0123456789"
TIMEOUT = 30


def request(service: str) -> bytes:
    """HealthCheckRequest{service}: field 1, length-delimited (empty: no bytes at all)."""
    data = service.encode()
    return b"\x0a" + bytes([len(data)]) + data if data else b""


def check(address: str, service: str = "") -> bytes:
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(CHECK)(request(service), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    root = tmp_path_factory.mktemp("health")
    onnx_models.mlp(root / "models" / "mlp" / "1" / "model.onnx", hidden=16)
    keys = root / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: app, key: {KEY}, scope: infer}}\n")
    with serving(root / "models", "--api-keys", str(keys)) as proc:
        yield proc


def test_a_ready_server_is_serving_and_needs_no_key(keyed: VolleyProcess) -> None:
    assert check(keyed.grpc) == SERVING
    assert check(keyed.grpc, INFERENCE_SERVICE) == SERVING
    ready = "/inference.GRPCInferenceService/ServerReady"  # the v2 call does need a key
    with grpc.insecure_channel(keyed.grpc) as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(ready)(b"", timeout=TIMEOUT)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_unknown_services_and_malformed_requests_are_refused(keyed: VolleyProcess) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        check(keyed.grpc, "no.such.Service")
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert "unknown service 'no.such.Service'" in unknown.value.details()
    with grpc.insecure_channel(keyed.grpc) as channel, pytest.raises(grpc.RpcError) as malformed:
        channel.unary_unary(CHECK)(b"\x0a\x09short", timeout=TIMEOUT)  # length past the end
    assert malformed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert check(keyed.grpc) == SERVING  # and it goes on


def test_a_server_that_is_not_ready_is_not_serving(tmp_path: Path) -> None:
    """With a model that cannot load (strict readiness, the default), the server is not ready:
    /v2/health/ready answers 503 and the health check NOT_SERVING."""
    models = tmp_path / "models"
    onnx_models.mlp(models / "mlp" / "1" / "model.onnx", hidden=16)
    (models / "broken" / "1").mkdir(parents=True)
    (models / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    with serving(models, "--workers", "1") as proc:
        ready = requests.get(f"{proc.url}/v2/health/ready", timeout=TIMEOUT)
        assert ready.status_code == 503
        assert check(proc.grpc) == NOT_SERVING
        assert check(proc.grpc, INFERENCE_SERVICE) == NOT_SERVING
