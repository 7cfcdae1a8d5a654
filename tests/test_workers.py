"""`volley serve --workers 2`: worker processes serve under a supervisor, and the
server still behaves as one: counters and statistics sum over the workers, model control
reaches every worker, SIGTERM loses nothing, a killed worker is replaced.

The supervisor accepts every connection and passes it to the worker holding the fewest, so
requests on fresh connections alternate between the workers; which worker served what is read
from the per-process metric files, which holds a connection from /proc.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import requests
import test_repository
import tritonclient.grpc as grpcclient
from conftest import ROOT, VolleyProcess, copy_shipped_models, holders, serving
from metrics_scrape import scrape, total
from prometheus_client.mmap_dict import MmapedDict
from test_security import fraud_input, pki, tls_grpc  # noqa: F401 - pki is a fixture
from test_shutdown_load import SHUTTING_DOWN, grpc_outcome

TIMEOUT = 60
WORKERS = ("--workers", "2")
X = np.full((1, 32), 0.25, np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": X[0].tolist()}]}


def events(proc: VolleyProcess, name: str) -> list[dict]:
    """The log entries of one event, in order."""
    entries = (json.loads(line) for line in proc.log().splitlines() if line.startswith("{"))
    return [entry for entry in entries if entry.get("event") == name]


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def served_by_pid(proc: VolleyProcess, model: str) -> dict[int, float]:
    """Successful requests to `model` per worker pid, from the multiprocess metric files."""
    directory = Path(events(proc, "workers")[0]["directory"])
    served: dict[int, float] = collections.Counter()
    for path in directory.glob("counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            wanted = {"model": model, "outcome": "success"}
            if name == "volley_requests_total" and wanted.items() <= labels.items():
                served[int(path.stem.split("_")[1])] += value
    return served


def successes(proc: VolleyProcess, model: str) -> float:
    """`volley_requests_total{outcome="success"}` of `model`, from one scrape."""
    samples = scrape(f"http://127.0.0.1:{proc.metrics_port}/metrics")
    return total(samples, "volley_requests_total", model=model, outcome="success")


def infer_http(proc: VolleyProcess, model: str = "mlp") -> requests.Response:
    """One inference on a new connection."""
    return requests.post(f"{proc.url}/v2/models/{model}/infer", json=BODY, timeout=TIMEOUT)


def infer_grpc(proc: VolleyProcess) -> None:
    """One inference on a new channel."""
    client = grpcclient.InferenceServerClient(proc.grpc)
    try:
        tensor = grpcclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(X)
        client.infer("mlp", [tensor], client_timeout=TIMEOUT)
    finally:
        client.close()


@pytest.fixture(scope="module")
def cluster(repository: Path) -> Iterator[VolleyProcess]:
    with serving(repository, *WORKERS) as proc:
        yield proc


def test_requests_spread_over_the_workers_and_counts_sum(cluster: VolleyProcess) -> None:
    def stats_http() -> dict:
        url = f"{cluster.url}/v2/models/mlp/versions/2/stats"
        return requests.get(url, timeout=TIMEOUT).json()["model_stats"][0]

    def stats_grpc() -> dict:
        client = grpcclient.InferenceServerClient(cluster.grpc)
        try:
            return client.get_inference_statistics("mlp", "2", as_json=True)["model_stats"][0]
        finally:
            client.close()

    counted, stats = successes(cluster, "mlp"), stats_http()
    sent = 40
    for _ in range(sent):
        assert infer_http(cluster).status_code == 200
        infer_grpc(cluster)
    assert successes(cluster, "mlp") - counted == 2 * sent
    for after in (stats_http(), stats_grpc()):
        assert int(after["inference_count"]) - stats["inference_count"] == 2 * sent
        success = int(after["inference_stats"]["success"]["count"])
        assert success - stats["inference_stats"]["success"]["count"] == 2 * sent
    served = served_by_pid(cluster, "mlp")
    assert len([pid for pid, count in served.items() if count]) == 2, served
    assert sum(served.values()) == successes(cluster, "mlp")


def test_connections_are_balanced_over_the_workers(repository: Path) -> None:
    """Each new connection goes to the worker holding the fewest: 8 keep-alive HTTP connections
    and 8 gRPC channels opened together land 4 and 4 (the kernel's SO_REUSEPORT hash, used
    before, split 8 connections 7/1 in one run), and once one worker's clients have left, the
    next connections all go to it."""
    with serving(repository, *WORKERS) as proc:
        clients = [http.client.HTTPConnection("127.0.0.1", proc.http_port, timeout=TIMEOUT)
                   for _ in range(8)]  # fmt: skip
        for client in clients:
            client.connect()
        for client in clients:  # an answer: the worker has it
            client.request("POST", "/v2/models/mlp/infer", json.dumps(BODY))
            assert client.getresponse().status == 200
        held = holders(proc, proc.http_port)
        assert sorted(collections.Counter(held.values()).values()) == [4, 4], held

        channels = []
        for _ in range(8):  # own subchannels: grpcio would otherwise share one connection
            args = [("grpc.use_local_subchannel_pool", 1)]
            channels.append(grpcclient.InferenceServerClient(proc.grpc, channel_args=args))
        for channel in channels:
            tensor = grpcclient.InferInput("input", [1, 32], "FP32")
            tensor.set_data_from_numpy(X)
            channel.infer("mlp", [tensor], client_timeout=TIMEOUT)
        by_worker = collections.Counter(holders(proc, proc.grpc_port).values())
        assert sorted(by_worker.values()) == [4, 4], by_worker
        for channel in channels:
            channel.close()

        leaving = min(held.values())
        for client in clients:
            if held[client.sock.getsockname()[1]] == leaving:
                client.close()
        wait_for(lambda: leaving not in holders(proc, proc.http_port).values(), "the closes")
        time.sleep(0.5)  # the worker counts a close on its next loop iteration
        newcomers = [http.client.HTTPConnection("127.0.0.1", proc.http_port, timeout=TIMEOUT)
                     for _ in range(4)]  # fmt: skip
        for client in newcomers:
            client.request("POST", "/v2/models/mlp/infer", json.dumps(BODY))
            assert client.getresponse().status == 200
        held = holders(proc, proc.http_port)
        assert [held[client.sock.getsockname()[1]] for client in newcomers] == [leaving] * 4
        for client in clients + newcomers:
            client.close()


def test_process_metrics_cover_every_process(cluster: VolleyProcess) -> None:
    (ready,) = events(cluster, "ready")
    pids = [cluster.proc.pid, *ready["workers"]]
    pages = os.sysconf("SC_PAGE_SIZE")
    rss = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * pages for pid in pids]
    samples = scrape(f"http://127.0.0.1:{cluster.metrics_port}/metrics")
    assert total(samples, "process_resident_memory_bytes") > 0.8 * sum(rss)
    assert total(samples, "process_cpu_seconds_total") > 0
    # the same whole-server view from the HTTP port, whichever worker answers
    for _ in range(4):
        samples = scrape(cluster.url + "/metrics")
        assert total(samples, "process_resident_memory_bytes") > 0.8 * sum(rss)


def test_the_supervisor_stays_small(cluster: VolleyProcess) -> None:
    """The supervisor only starts and watches workers: it loads no front end, no ONNX Runtime
    and no model, so it costs tens of MB, not another worker's worth."""
    pages = os.sysconf("SC_PAGE_SIZE")
    rss = int(Path(f"/proc/{cluster.proc.pid}/statm").read_text().split()[1]) * pages
    (ready,) = events(cluster, "ready")
    worker = int(Path(f"/proc/{ready['workers'][0]}/statm").read_text().split()[1]) * pages
    assert rss < 80 * 2**20 and rss < worker / 2, (rss, worker)


def test_requests_in_flight_are_seen_whichever_worker_is_scraped(tmp_path: Path) -> None:
    """`volley_inflight_requests` is a plain count in each worker, published when scraped and
    every second: scrapes on one kept-alive connection (as Prometheus makes them), so always
    answered by the same worker, see the requests in flight in both, and zero once answered."""
    onnx_models.slow(
        tmp_path / "models" / "slower" / "1" / "model.onnx", iterations=100_000
    )  # ~2 s a run
    onnx_models.write_config(
        tmp_path / "models" / "slower",
        {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 4}, "intra_op_threads": 1},
    )
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 512], "data": [0.1] * 512}]}
    with serving(tmp_path / "models", *WORKERS) as proc:
        url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
        scraper = requests.Session()

        def in_flight() -> float:
            return total(scrape(url, scraper), "volley_inflight_requests", protocol="http")

        def slow_request() -> int:
            reply = requests.post(f"{proc.url}/v2/models/slower/infer", json=body, timeout=TIMEOUT)
            return reply.status_code

        with ThreadPoolExecutor(3) as pool:  # on new connections, so over both workers
            held = [pool.submit(slow_request) for _ in range(3)]
            wait_for(lambda: in_flight() == 3, "three requests in flight")
            assert [future.result(TIMEOUT) for future in held] == [200] * 3
        wait_for(lambda: in_flight() == 0, "no request in flight")


@pytest.fixture
def serve() -> Iterator[Callable[..., VolleyProcess]]:
    """test_repository's `serve`, with two workers."""
    yield from test_repository.servers(*WORKERS)


# test_repository's model control tests, run on two workers: each request there opens a new
# connection, so every step is checked against whichever worker answers.
def test_load_unload_reload_over_http(tmp_path: Path, serve) -> None:
    test_repository.test_load_unload_reload_over_http(tmp_path, serve)


def test_load_unload_over_grpc(tmp_path: Path, serve) -> None:
    test_repository.test_load_unload_over_grpc(tmp_path, serve)


def test_poll_adds_and_removes_models(tmp_path: Path, serve) -> None:
    test_repository.test_poll_adds_and_removes_models(tmp_path, serve)


def test_a_client_rate_limit_holds_across_the_workers(repository: Path) -> None:
    """--rate-limit 2 --rate-burst 10 with two workers: 40 requests from one address, each on a
    new connection (the supervisor spreads them over both workers), get about one burst of
    answers, not one per worker; the rest are refused with 429."""
    with serving(repository, *WORKERS, "--rate-limit", "2", "--rate-burst", "10") as proc:
        started = time.monotonic()
        codes = [infer_http(proc).status_code for _ in range(40)]
        elapsed = time.monotonic() - started
        served = served_by_pid(proc, "mlp")
    assert set(codes) == {200, 429}, codes
    assert len([pid for pid, count in served.items() if count]) == 2, served  # both answered
    assert 10 <= codes.count(200) <= 10 + 2 * elapsed + 1, (codes.count(200), elapsed)


def test_a_killed_worker_is_replaced_and_catches_up(repository: Path) -> None:
    with serving(repository, *WORKERS) as proc:
        assert requests.post(f"{proc.url}/v2/repository/models/bare/unload").status_code == 200
        ok = sum(infer_http(proc).status_code == 200 for _ in range(20))
        (ready,) = events(proc, "ready")
        victim = ready["workers"][0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: events(proc, "worker_exited"), "the supervisor to see the death")
        (exited,) = events(proc, "worker_exited")
        assert exited["pid"] == victim and exited["restart"]
        # the survivor serves while the replacement loads; the replacement only once loaded
        ok += sum(infer_http(proc).status_code == 200 for _ in range(20))
        wait_for(lambda: len(events(proc, "worker_ready")) == 3, "the replacement")
        for _ in range(40):
            assert infer_http(proc).status_code == 200
            ready_bare = requests.get(f"{proc.url}/v2/models/bare/ready", timeout=TIMEOUT)
            assert ready_bare.status_code == 503  # the unload was replayed to the replacement
        assert ok == 40
        replacement = events(proc, "worker_started")[-1]["pid"]
        assert served_by_pid(proc, "mlp")[replacement] > 0
        # the dead worker's counts stay in the sums
        assert successes(proc, "mlp") == 80


def test_sigterm_under_load_loses_nothing(tmp_path: Path) -> None:
    """Clients on keep-alive HTTP connections and gRPC channels send until refused."""
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    go = threading.Barrier(17)
    proc = VolleyProcess(copy_shipped_models(tmp_path), "--metrics-port", "0", *WORKERS)
    proc.wait_models()
    body = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 17], "data": [0.5] * 17}]
    }

    def http_client() -> None:
        session = requests.Session()
        go.wait()
        while True:
            try:
                response = session.post(
                    proc.url + "/v2/models/fraud/infer", json=body, timeout=TIMEOUT
                )
            except requests.ConnectionError as exc:
                outcome = "refused" if "Connection refused" in str(exc) else f"lost: {exc}"
            else:
                refused = response.status_code == 503 and SHUTTING_DOWN in response.text
                ok = response.status_code == 200
                outcome = "ok" if ok else "refused" if refused else response.text
            with lock:
                outcomes[outcome] += 1
            if outcome != "ok":
                return

    def grpc_client() -> None:
        client = grpcclient.InferenceServerClient(proc.grpc)
        tensor = fraud_input(grpcclient)
        go.wait()
        while True:
            try:
                client.infer("fraud", [tensor], client_timeout=TIMEOUT)
                outcome = "ok"
            except grpcclient.InferenceServerException as exc:
                outcome = grpc_outcome(exc)
            with lock:
                outcomes[outcome] += 1
            if outcome != "ok":
                client.close()
                return

    threads = [threading.Thread(target=http_client) for _ in range(8)]
    threads += [threading.Thread(target=grpc_client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        go.wait()
        wait_for(lambda: outcomes["ok"] >= 500, "traffic")
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for thread in threads:
            thread.join(TIMEOUT)
        assert proc.proc.wait(TIMEOUT) == 0, proc.log()
    finally:
        proc.stop()
    assert time.monotonic() - signalled < 30
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    assert outcomes["refused"] == 16, outcomes
    assert len(events(proc, "stopped")) == 3  # both workers drained, then the supervisor
    assert "Traceback" not in proc.log()


def test_tls_with_workers(tmp_path: Path, pki: dict[str, Path]) -> None:  # noqa: F811
    tls = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    with serving(copy_shipped_models(tmp_path), *tls, *WORKERS) as proc:
        https = f"https://localhost:{proc.http_port}/v2/models/fraud/infer"
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 17],
                            "data": [0.5] * 17}]}  # fmt: skip
        for _ in range(10):
            reply = requests.post(https, json=body, verify=pki["ca"], timeout=TIMEOUT)
            assert reply.status_code == 200, reply.text
            client = tls_grpc(proc, pki, None)
            assert client.infer("fraud", [fraud_input(grpcclient)]).as_numpy("score").shape
            client.close()
        assert len(served_by_pid(proc, "fraud")) == 2


def test_a_port_another_program_shares_is_still_refused(tmp_path: Path) -> None:
    """A port another program holds (with SO_REUSEPORT, which would let a second socket
    bind it) is refused before any worker starts."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        run = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--model-repository", str(tmp_path),
             "--host", "127.0.0.1", "--http-port", port, *WORKERS],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr.strip().splitlines()[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_ipv6_host_is_served(repository: Path, workers: str) -> None:
    """`--host ::1` is bound as IPv6, by one process and by the supervisor (the start-up check
    of the ports used to probe it as IPv4 and refused it)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    with serving(repository, "--workers", workers, host="::1") as proc:
        assert infer_http(proc).status_code == 200
        infer_grpc(proc)


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_workers_flag_needs_a_count_or_auto(value: str) -> None:
    run = subprocess.run([sys.executable, "-m", "server", "serve", "--workers", value],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert run.returncode == 2
    assert "expected a count of at least 1 or 'auto'" in run.stderr
