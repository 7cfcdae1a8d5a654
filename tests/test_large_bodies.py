"""Large request bodies never stall the server nor balloon its memory.

JSON tensor data over `--max-json-bytes` is refused (413) from its headers, before the body is
read; large JSON under it is decoded in a worker process, not on the event loop that serves
every other request. Senders run in their own processes at the lowest CPU priority, so what the
probe measures is the server, not the load generator competing for the machine's two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import VolleyProcess, child_processes, copy_shipped_models, running, serving

SENDER = r"""
import os, sys, time, numpy as np, orjson, requests
os.nice(19)
megabytes, url, seconds = float(sys.argv[1]), sys.argv[2], float(sys.argv[3])
rows = int(megabytes * 1e6 / 9 / 17)
data = np.random.default_rng(0).random(rows * 17).round(6).tolist()
body = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [rows, 17], "data": data}]}
)
print(len(body), flush=True)
sys.stdin.readline()  # go
session, counts, end = requests.Session(), {}, time.monotonic() + seconds
while time.monotonic() < end:
    try:
        reply = session.post(url, data=body, headers={"content-type": "application/json"})
        key = f"{reply.status_code} {reply.json()['error'][:40]}"
    except requests.ConnectionError:
        key, session = "reset", requests.Session()
    counts[key] = counts.get(key, 0) + 1
print(orjson.dumps(counts).decode(), flush=True)
"""


@pytest.fixture(scope="module")
def volley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    root = copy_shipped_models(tmp_path_factory.mktemp("large"))
    with serving(root, "--metrics-port", "0", "--max-json-bytes", str(16 * 2**20)) as proc:
        yield proc


def rss_mb(proc: VolleyProcess) -> float:
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def flood(proc: VolleyProcess, megabytes: float, seconds: float = 6.0) -> dict:
    """Four processes send `megabytes` JSON bodies to fraud while this one probes fraud over
    gRPC every 5 ms; returns the probe's latencies, the senders' outcomes and peak RSS."""
    url = proc.url + "/v2/models/fraud/infer"
    senders = [
        subprocess.Popen(
            [sys.executable, "-c", SENDER, str(megabytes), url, str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    sizes = [int(s.stdout.readline()) for s in senders]  # bodies built
    client = grpcclient.InferenceServerClient(proc.grpc)
    tensor = grpcclient.InferInput("features", [1, 17], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(1).random((1, 17), np.float32))
    for _ in range(20):
        client.infer("fraud", [tensor])
    before = rss_mb(proc)
    for sender in senders:
        sender.stdin.write("\n")
        sender.stdin.flush()
    latencies, peak = [], before
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        result = client.infer("fraud", [tensor])
        latencies.append(time.perf_counter() - started)
        assert result.as_numpy("score").shape == (1, 1)
        peak = max(peak, rss_mb(proc))
        time.sleep(0.005)
    outcomes: dict[str, int] = {}
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        for key, count in orjson.loads(out).items():
            outcomes[key] = outcomes.get(key, 0) + count
    client.close()
    ms = np.array(latencies) * 1e3
    report = {
        "body_mb": sizes[0] / 1e6,
        "outcomes": outcomes,
        "probes": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "rss_before_mb": before,
        "rss_peak_mb": peak,
    }
    print(report)
    return report


def test_json_over_the_limit_is_refused_before_it_is_read(volley: VolleyProcess) -> None:
    """50 MB JSON bodies: each is refused 413 with a message, from its Content-Length."""
    report = flood(volley, 50)
    refused = [k for k in report["outcomes"] if k.startswith("413 JSON part of the request")]
    assert refused and set(report["outcomes"]) <= {*refused, "reset"}, report
    assert sum(report["outcomes"][k] for k in refused) >= 40, report
    # The server reads none of the 200 MB in flight. Its RSS still rises to a plateau near
    # +250 MB (allocator high-water from thousands of short connections; 16 s runs level off),
    # far from the +800 MB that parsing the bodies cost before.
    assert report["rss_peak_mb"] - report["rss_before_mb"] < 400, report
    assert report["p99_ms"] < 50, report


def test_large_json_is_decoded_off_the_event_loop(volley: VolleyProcess) -> None:
    """12 MB JSON bodies (about 200 ms of decoding each) go to the decoder process: the
    server keeps answering a concurrent gRPC call in milliseconds. Decoded on the event loop,
    four of them would hold every other request for most of a second."""
    report = flood(volley, 12)
    # decoded, then refused for its batch size: the whole body was parsed, off the loop
    decoded = [k for k in report["outcomes"] if k.startswith("400 input 'features' has batch")]
    busy = [k for k in report["outcomes"] if k.startswith("429")]
    assert decoded and set(report["outcomes"]) <= {*decoded, *busy}, report
    assert report["p99_ms"] < 50, report
    assert report["rss_peak_mb"] - report["rss_before_mb"] < 1000, report


def test_large_json_within_limits_is_answered(volley: VolleyProcess) -> None:
    """A 1,024-row JSON request (past the inline size, so decoded in the worker process)
    gets the same scores as the same rows sent as binary data."""
    rows = np.random.default_rng(2).random((1024, 17), np.float32)
    body = orjson.dumps(
        {
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1024, 17], "data": rows}],
            "outputs": [{"name": "score"}],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    assert len(body) > 128 * 1024
    reply = requests.post(volley.url + "/v2/models/fraud/infer", data=body, timeout=60)
    assert reply.status_code == 200, reply.text
    (out,) = reply.json()["outputs"]
    client = grpcclient.InferenceServerClient(volley.grpc)
    tensor = grpcclient.InferInput("features", [1024, 17], "FP32")
    tensor.set_data_from_numpy(rows)
    expected = client.infer("fraud", [tensor]).as_numpy("score")
    client.close()
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(1024, 1), expected)


def test_control_bodies_are_bounded(volley: VolleyProcess) -> None:
    """Control routes read JSON too: a body past --max-json-bytes is refused, not buffered."""
    huge = b'{"parameters": {"config": "' + b"x" * (17 * 2**20) + b'"}}'
    reply = requests.post(volley.url + "/v2/repository/index", data=huge, timeout=60)
    assert reply.status_code == 413, reply.text
    assert "exceeds" in reply.json()["error"]


def decoders(pid: int) -> set[int]:
    """The server's child processes that are spawned multiprocessing workers (not the
    resource tracker multiprocessing starts beside them)."""
    return child_processes(pid, b"spawn_main")


def large_fraud_body(rows: int = 1024) -> bytes:
    data = np.random.default_rng(3).random((rows, 17), np.float32)
    return orjson.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [rows, 17], "data": data}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def test_the_decoder_process_restarts_and_never_outlives_the_server(tmp_path: Path) -> None:
    """Killed, the decoder process is started again by the next large body; the server
    SIGKILLed, the decoder exits by itself within seconds (no orphan left behind)."""
    proc = VolleyProcess(copy_shipped_models(tmp_path), "--metrics-port", "0")
    try:
        proc.wait_models()
        url = proc.url + "/v2/models/fraud/infer"
        assert not decoders(proc.proc.pid)  # started at the first large body
        assert requests.post(url, data=large_fraud_body(), timeout=60).status_code == 200
        (decoder,) = decoders(proc.proc.pid)
        os.kill(decoder, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while running(decoder):  # dead (a zombie until the server next looks at it)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        reply = requests.post(url, data=large_fraud_body(), timeout=60)
        assert reply.status_code == 200, reply.text
        (restarted,) = decoders(proc.proc.pid)
        assert restarted != decoder
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(60)
        deadline = time.monotonic() + 10
        while running(restarted):
            assert time.monotonic() < deadline, "the decoder outlived its server"
            time.sleep(0.1)
    finally:
        proc.stop()
