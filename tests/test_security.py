"""Access control and TLS: API keys with scopes on every HTTP, WebSocket and gRPC call but
liveness; TLS and mutual TLS on HTTP and gRPC from certificates made at test time."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import websockets.sync.client as wsclient
from certificates import Authority
from conftest import ROOT, VolleyProcess, copy_shipped_models, serving
from metrics_scrape import scrape, total
from tritonclient.utils import InferenceServerException
from websockets.exceptions import InvalidStatus

TIMEOUT = 60
INFER_KEY = "infer-key-0123456789abcdef"
ADMIN_KEY = "admin-key-fedcba9876543210"


def fraud_input(module) -> object:
    tensor = module.InferInput("features", [1, 17], "FP32")
    tensor.set_data_from_numpy(np.full((1, 17), 0.5, np.float32))
    return tensor


def bearer(key: str) -> dict[str, str]:
    """Credentials as HTTP headers or gRPC metadata (whose keys must be lowercase)."""
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    """Shipped models behind a key file: an infer key in clear, an admin key as its sha256."""
    base = tmp_path_factory.mktemp("keys")
    keys = base / "keys.yaml"
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    keys.write_text(
        f"keys:\n"
        f"  - {{name: app, key: {INFER_KEY}, scope: infer}}\n"
        f"  - {{name: ops, sha256: {digest}, scope: admin}}\n"
    )
    with serving(copy_shipped_models(base), "--api-keys", str(keys)) as proc:
        yield proc


def test_liveness_needs_no_key(keyed: VolleyProcess) -> None:
    assert requests.get(keyed.url + "/v2/health/live", timeout=TIMEOUT).status_code == 200
    client = grpcclient.InferenceServerClient(keyed.grpc)
    assert client.is_server_live()
    client.close()


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"], ids=["none", "unknown"])
def test_http_without_a_valid_key_is_401(keyed: VolleyProcess, key: str | None) -> None:
    headers = bearer(key) if key else {}
    for method, path in [
        ("POST", "/v2/models/fraud/infer"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/fraud"),
        ("POST", "/v2/repository/index"),
        ("GET", "/metrics"),
    ]:
        reply = requests.request(method, keyed.url + path, headers=headers, timeout=TIMEOUT)
        assert reply.status_code == 401, (path, reply.text)
        assert "API key" in reply.json()["error"]
        assert reply.headers["www-authenticate"] == "Bearer"
    assert key is None or key not in keyed.log()  # a presented key is never logged


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"], ids=["none", "unknown"])
def test_grpc_without_a_valid_key_is_unauthenticated(keyed: VolleyProcess, key: str | None) -> None:
    client = grpcclient.InferenceServerClient(keyed.grpc)
    headers = bearer(key) if key else None
    try:
        for call in (
            lambda: client.infer("fraud", [fraud_input(grpcclient)], headers=headers),
            lambda: client.is_server_ready(headers=headers),
            lambda: client.get_inference_statistics(headers=headers),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
            assert "API key" in info.value.message()
    finally:
        client.close()


def test_grpc_stream_without_a_key_is_unauthenticated(keyed: VolleyProcess) -> None:
    channel = grpc.insecure_channel(keyed.grpc)
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b""]), timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_infer_key_runs_inference_on_every_protocol(keyed: VolleyProcess) -> None:
    http = httpclient.InferenceServerClient(keyed.http)
    scores = http.infer("fraud", [fraud_input(httpclient)], headers=bearer(INFER_KEY))
    assert scores.as_numpy("score").shape == (1, 1)
    assert http.is_server_ready(headers=bearer(INFER_KEY))
    http.close()
    client = grpcclient.InferenceServerClient(keyed.grpc)
    result = client.infer("fraud", [fraud_input(grpcclient)], headers=bearer(INFER_KEY))
    np.testing.assert_allclose(result.as_numpy("score"), scores.as_numpy("score"), rtol=1e-6)
    answers = []
    client.start_stream(
        lambda result, error: answers.append((result, error)), headers=bearer(INFER_KEY)
    )
    client.async_stream_infer("fraud", [fraud_input(grpcclient)])
    client.stop_stream()
    client.close()
    assert len(answers) == 1 and answers[0][1] is None, answers


def test_infer_key_cannot_control_models_or_read_statistics(keyed: VolleyProcess) -> None:
    for method, path in [
        ("POST", "/v2/repository/models/fraud/unload"),
        ("POST", "/v2/repository/models/fraud/load"),
        ("GET", "/v2/models/fraud/stats"),
        ("GET", "/metrics"),
    ]:
        reply = requests.request(
            method, keyed.url + path, headers=bearer(INFER_KEY), timeout=TIMEOUT
        )
        assert reply.status_code == 403, (path, reply.text)
        assert "needs 'admin'" in reply.json()["error"]
    client = grpcclient.InferenceServerClient(keyed.grpc)
    try:
        for call in (
            lambda: client.unload_model("fraud", headers=bearer(INFER_KEY)),
            lambda: client.get_inference_statistics("fraud", headers=bearer(INFER_KEY)),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.PERMISSION_DENIED", info.value
        assert client.is_model_ready("fraud", headers=bearer(INFER_KEY))  # nothing was unloaded
    finally:
        client.close()


def test_admin_key_controls_models(keyed: VolleyProcess) -> None:
    client = grpcclient.InferenceServerClient(keyed.grpc)
    try:
        stats = client.get_inference_statistics("fraud", headers=bearer(ADMIN_KEY), as_json=True)
        assert stats["model_stats"][0]["name"] == "fraud"
        client.unload_model("detect", headers=bearer(ADMIN_KEY))
        assert not client.is_model_ready("detect", headers=bearer(ADMIN_KEY))
        reply = requests.post(
            keyed.url + "/v2/repository/models/detect/load",
            headers=bearer(ADMIN_KEY),
            timeout=TIMEOUT,
        )
        assert reply.status_code == 200, reply.text
        assert client.is_model_ready("detect", headers=bearer(ADMIN_KEY))
    finally:
        client.close()
    metrics = requests.get(keyed.url + "/metrics", headers=bearer(ADMIN_KEY), timeout=TIMEOUT)
    assert metrics.status_code == 200 and "volley_requests_total" in metrics.text


def test_refused_inference_is_counted(keyed: VolleyProcess) -> None:
    """Inference refused for its key is counted by protocol and outcome, like any other."""
    metrics_url = f"http://127.0.0.1:{keyed.metrics_port}/metrics"
    before = scrape(metrics_url)
    infer = keyed.url + "/v2/models/fraud/infer"
    logged = keyed.log().count('"event":"auth_refused"')
    assert requests.post(infer, data=b"{}", timeout=TIMEOUT).status_code == 401
    assert keyed.log().count('"event":"auth_refused"') == logged + 1  # logged once
    client = grpcclient.InferenceServerClient(keyed.grpc)
    with pytest.raises(InferenceServerException):
        client.infer("fraud", [fraud_input(grpcclient)])
    client.close()
    after = scrape(metrics_url)

    def delta(**labels: str) -> float:
        name = "volley_requests_total"
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta(model="fraud", protocol="http", outcome="unauthenticated") == 1
    assert delta(model="", protocol="grpc", outcome="unauthenticated") == 1


def test_websocket_takes_the_key_as_a_query_parameter(keyed: VolleyProcess) -> None:
    url = f"ws://{keyed.http}/v2/models/detect/stream"
    with pytest.raises(InvalidStatus) as info:
        wsclient.connect(url, open_timeout=TIMEOUT)
    assert info.value.response.status_code == 403
    with wsclient.connect(f"{url}?api_key={INFER_KEY}", open_timeout=TIMEOUT) as ws:
        ws.send('{"parameters": {}}')  # a header message: accepted, nothing to answer
    with wsclient.connect(url, additional_headers=bearer(INFER_KEY), open_timeout=TIMEOUT):
        pass
    # the camera page itself is static and public; its WebSocket carries the key
    assert requests.get(keyed.url + "/camera", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize(
    "content, reason",
    [
        ("keys: []\n", "holds no key"),
        ("keys:\n  - {name: a, key: short, scope: infer}\n", "at least 16 characters"),
        ("keys:\n  - {name: a, key: 0123456789abcdefgh, scope: root}\n", "scope must be"),
        ("keys:\n  - {name: a, sha256: nothex, scope: admin}\n", "64 hex digits"),
        ("- not a mapping\n", "expected a 'keys' list"),
    ],
)
def test_a_bad_key_file_stops_the_start(tmp_path: Path, content: str, reason: str) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(content)
    run = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(ROOT / "models"),
         "--api-keys", str(keys), "--http-port", "0"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 1
    assert reason in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = Authority(folder, "volley-ca"), Authority(folder, "stranger-ca")
    server_cert, server_key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    stranger_cert, stranger_key = stranger.issue("stranger", server=False)
    return {
        "ca": ca.pem,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "stranger_cert": stranger_cert,
        "stranger_key": stranger_key,
    }


def tls_grpc(proc: VolleyProcess, pki: dict[str, Path], client: str | None):
    kwargs = {"ssl": True, "root_certificates": str(pki["ca"])}
    if client:
        kwargs |= {"private_key": str(pki[f"{client}_key"]),
                   "certificate_chain": str(pki[f"{client}_cert"])}  # fmt: skip
    return grpcclient.InferenceServerClient(f"localhost:{proc.grpc_port}", **kwargs)


def test_tls_on_http_and_grpc(tmp_path: Path, pki: dict[str, Path]) -> None:
    """HTTPS and gRPC over TLS work for clients trusting the CA, fail for the others; the
    untrusting client's socket stays open (pytest keeps its exception), and the server still
    exits within --shutdown-timeout."""
    tls = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
           "--shutdown-timeout", "5"]  # fmt: skip
    with serving(copy_shipped_models(tmp_path), *tls) as proc:
        https = f"https://localhost:{proc.http_port}"
        assert requests.get(https + "/v2/health/ready", verify=pki["ca"], timeout=TIMEOUT).ok
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 17],
                            "data": [0.5] * 17}]}  # fmt: skip
        reply = requests.post(https + "/v2/models/fraud/infer", json=body, verify=pki["ca"])
        assert reply.status_code == 200, reply.text
        with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust it
            requests.get(https + "/v2/health/live", timeout=TIMEOUT)
        with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port
            requests.get(proc.url + "/v2/health/live", timeout=TIMEOUT)
        client = tls_grpc(proc, pki, None)
        result = client.infer("fraud", [fraud_input(grpcclient)])
        score = reply.json()["outputs"][0]["data"]
        np.testing.assert_allclose(result.as_numpy("score").ravel(), score, rtol=1e-6)
        client.close()
        plain = grpcclient.InferenceServerClient(proc.grpc)
        with pytest.raises(InferenceServerException) as info:
            plain.is_server_live(client_timeout=5)
        assert info.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        plain.close()
        # the metrics port stays plain unless --metrics-tls
        assert requests.get(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=TIMEOUT).ok


def test_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
           "--tls-client-ca", str(pki["ca"]), "--metrics-tls"]  # fmt: skip
    with serving(copy_shipped_models(tmp_path), *tls) as proc:
        https = f"https://localhost:{proc.http_port}/v2/health/ready"
        cert = (str(pki["client_cert"]), str(pki["client_key"]))
        assert requests.get(https, verify=pki["ca"], cert=cert, timeout=TIMEOUT).ok
        stranger = (str(pki["stranger_cert"]), str(pki["stranger_key"]))
        for presented in (None, stranger):
            with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
                requests.get(https, verify=pki["ca"], cert=presented, timeout=TIMEOUT)
        client = tls_grpc(proc, pki, "client")
        assert client.infer("fraud", [fraud_input(grpcclient)]).as_numpy("score").shape == (1, 1)
        client.close()
        for presented in (None, "stranger"):
            client = tls_grpc(proc, pki, presented)
            with pytest.raises(InferenceServerException) as info:
                client.is_server_live(client_timeout=5)
            assert info.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
            client.close()
        metrics = f"https://localhost:{proc.metrics_port}/metrics"
        assert requests.get(metrics, verify=pki["ca"], cert=cert, timeout=TIMEOUT).ok
