"""Check a running Volley image by hand: it serves the shipped models and drains on SIGTERM.

    ../shared/tools/container run volley:cpu --host 127.0.0.1 &        # or docker run -p ...
    python deploy/container/smoke.py --pid "$(pgrep -f 'volley serve' -n)"

Without --pid it only checks serving. With --pid (the server process, as seen from the host)
it then sends SIGTERM while detection requests are in flight and checks that every request
was answered (200) or refused (503), never cut off, that readiness turned false and that
requests sent after it are refused with 503. The server's exit code is the caller's to check.
Run from the repository's virtual environment (requests, tritonclient, numpy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "docs" / "samples" / "street-1.jpg"
FRAUD_REQUEST = ROOT / "docs" / "samples" / "fraud-request.json"


def wait_ready(url: str, timeout: float) -> None:
    """Block until GET /v2/health/ready answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def check_serving(host: str, http_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    """Infer on fraud (HTTP, gRPC), detector (raw tensor) and detect (a JPEG); read /metrics."""
    url = f"http://{host}:{http_port}"
    done = []
    index = requests.post(f"{url}/v2/repository/index", timeout=10).json()
    states = {m["name"]: m["state"] for m in index}
    assert states == {"detect": "READY", "detector": "READY", "fraud": "READY"}, states
    done.append(f"repository index: {states}")

    answer = requests.post(f"{url}/v2/models/fraud/infer", data=FRAUD_REQUEST.read_bytes(),
                           timeout=10)  # fmt: skip
    assert answer.status_code == 200, answer.text
    scores = {o["name"]: o["data"] for o in answer.json()["outputs"]}["score"]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores), scores
    done.append(f"fraud over HTTP JSON: scores {[round(s, 4) for s in scores]}")

    client = grpcclient.InferenceServerClient(f"{host}:{grpc_port}")
    rows = np.array(json.loads(FRAUD_REQUEST.read_text())["inputs"][0]["data"], np.float32)
    features = grpcclient.InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows)
    grpc_scores = client.infer("fraud", [features]).as_numpy("score").ravel()
    np.testing.assert_allclose(grpc_scores, scores, rtol=1e-5)
    done.append("fraud over gRPC: same scores")

    images = grpcclient.InferInput("images", [1, 3, 320, 320], "FP32")
    images.set_data_from_numpy(np.full((1, 3, 320, 320), 0.5, np.float32))
    boxes = client.infer("detector", [images]).as_numpy("detections")
    assert boxes.shape == (1, 100, 6), boxes.shape
    client.close()
    done.append(f"detector over gRPC (raw 1x3x320x320 tensor): detections {boxes.shape}")

    http = httpclient.InferenceServerClient(f"{host}:{http_port}")
    image = httpclient.InferInput("images", [1], "BYTES")
    image.set_data_from_numpy(np.array([SAMPLE.read_bytes()], dtype=np.object_))
    found = int(http.infer("detect", [image]).as_numpy("num_detections")[0])
    http.close()
    assert found > 0, "no detection in the sample street image"
    done.append(f"detect pipeline over HTTP (binary, {SAMPLE.name}): {found} detections")

    text = requests.get(f"http://{host}:{metrics_port}/metrics", timeout=10).text
    for name in ("volley_requests_total", "volley_request_duration_seconds_bucket",
                 "process_resident_memory_bytes", "python_info"):  # fmt: skip
        assert f"\n{name}" in text, f"{name} missing from /metrics"
    done.append("metrics port: volley_*, process_* and python_* series present")
    return done


def check_drain(host: str, http_port: int, pid: int, requests_in_flight: int = 32) -> list[str]:
    """SIGTERM with detection requests in flight: each is answered or refused, none cut off."""
    url = f"http://{host}:{http_port}"
    body = SAMPLE.read_bytes()
    tensor = {"name": "images", "shape": [1], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(body) + 4}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]})
    payload = header.encode() + len(body).to_bytes(4, "little") + body
    statuses: list[object] = []
    lock = threading.Lock()

    def send() -> None:
        try:
            status: object = requests.post(
                f"{url}/v2/models/detect/infer", data=payload, timeout=60,
                headers={"Inference-Header-Content-Length": str(len(header))},
            ).status_code  # fmt: skip
        except requests.RequestException as exc:
            status = type(exc).__name__
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send) for _ in range(requests_in_flight)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    ready: object = 200
    while ready == 200 and time.monotonic() - signalled < 2:  # the signal is handled async
        try:
            ready = requests.get(f"{url}/v2/health/ready", timeout=2).status_code
        except requests.RequestException as exc:
            ready = type(exc).__name__
    not_ready_after = time.monotonic() - signalled
    refused = [  # new work while draining: refused at once, the connection not cut
        requests.post(f"{url}/v2/models/detect/infer", data=payload, timeout=10,
                      headers={"Inference-Header-Content-Length": str(len(header))}).status_code
        for _ in range(3)
    ]  # fmt: skip
    for thread in threads:
        thread.join()
    assert all(s in (200, 503) for s in statuses), statuses
    assert ready != 200, "still ready 2 s after SIGTERM"
    assert refused == [503] * len(refused), refused
    counts = {s: statuses.count(s) for s in sorted(set(statuses), key=str)}
    return [
        f"SIGTERM with {requests_in_flight} detect requests in flight: answers {counts} "
        f"(none cut off); readiness {ready} {not_ready_after * 1000:.0f} ms after SIGTERM; "
        f"requests sent after it: {refused}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--pid", type=int, help="server process to SIGTERM for the drain check")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    args = parser.parse_args()
    wait_ready(f"http://{args.host}:{args.http_port}", args.timeout)
    done = check_serving(args.host, args.http_port, args.grpc_port, args.metrics_port)
    if args.pid:
        done += check_drain(args.host, args.http_port, args.pid)
    print("\n".join(f"ok: {line}" for line in done))


if __name__ == "__main__":
    main()
