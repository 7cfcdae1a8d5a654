"""Shared fixtures: a model repository of real ONNX models and a real Volley server process."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
import onnx_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _ephemeral_low() -> int:
    """Where the kernel's range for outgoing connections' local ports starts."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()
_ports = random.Random(os.getpid())


def free_port() -> int:
    """A TCP port nobody listens on right now, below the ephemeral range.

    A port the kernel hands out for `bind(0)` comes from the range outgoing connections use too,
    so a client's connection could take it before the server binds it (seen once in CI). Ports
    below that range are only ever taken by a listener, and none is handed out twice.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(1000):
        port = _ports.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


class VolleyProcess:
    """`python -m server serve` on free loopback ports, stopped with SIGTERM."""

    def __init__(
        self,
        repository: Path,
        *extra: str,
        python: str = sys.executable,
        ports: tuple[int, int, int] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`ports`: (http, grpc, metrics) to listen on (a restart on the same ports); `host`:
        the loopback address to listen on."""
        self.http_port, self.grpc_port, self.metrics_port = ports or (
            free_port(),
            free_port(),
            free_port(),
        )
        address = f"[{host}]" if ":" in host else host
        self.http = f"{address}:{self.http_port}"
        self.grpc = f"{address}:{self.grpc_port}"
        self.url = f"http://{self.http}"
        self.log_path = repository.parent / f"volley-{self.http_port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                python,
                "-m",
                "server",
                "serve",
                "--model-repository",
                str(repository),
                "--host",
                host,
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
                # one process unless a test asks for workers (the README's tests serve as shipped)
                *(() if "--workers" in extra else ("--workers", "1")),
                *extra,
            ],  # fmt: skip
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout: float = 60.0, path: str = "/v2/health/live") -> None:
        """Block until the server answers 200 on `path`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def wait_models(self, timeout: float = 90.0) -> None:
        """Block until the server has tried to load every model (its `ready` log event).

        The repository index cannot tell a model not loaded yet from a broken one (both are
        UNAVAILABLE), so this waits for the log line the server writes after loading.
        """
        deadline = time.monotonic() + timeout
        while '"event":"ready"' not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not finish loading in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """Everything the server has logged so far (also after `stop`)."""
        # The server writes through its own file descriptor; ours only needs closing, never
        # flushing, so reading the file works before and after `stop` alike.
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for exit, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def serving(
    repository: Path, *extra: str, exit_code: int | None = 0, host: str = "127.0.0.1"
) -> Iterator[VolleyProcess]:
    """A server on `repository` (listening on `host`) that has tried to load every model;
    stopped on exit.

    When the block ends without an error, the server must exit with `exit_code` (None: any),
    else the test fails with the server's log.
    """
    proc = VolleyProcess(repository, *extra, host=host)
    try:
        proc.wait_models()
        yield proc
    except BaseException:
        proc.stop()
        raise
    code = proc.stop()
    if exit_code is not None and code != exit_code:
        pytest.fail(f"server exited with {code}, expected {exit_code}:\n{proc.log()}")


def build_repository(root: Path) -> Path:
    """The shared test repository: mlp (2 versions), dtypes, rowsum, slow, and a bare model."""
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", seed=1)
    onnx_models.mlp(root / "mlp" / "2" / "model.onnx", seed=2)
    onnx_models.write_config(
        root / "mlp",
        {
            "max_batch_size": 64,
            "dynamic_batching": {"max_queue_delay_us": 2000, "max_queue_size": 4096},
            "parameters": {"purpose": "tests"},
        },
    )
    onnx_models.dtypes(root / "dtypes" / "1" / "model.onnx")
    onnx_models.write_config(root / "dtypes", {"max_batch_size": 8, "dynamic_batching": {}})
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    onnx_models.variable_length(root / "rowsum" / "1" / "model.onnx")
    onnx_models.write_config(
        root / "rowsum",
        {"max_batch_size": 32, "dynamic_batching": {"max_queue_delay_us": 20000}},
    )
    onnx_models.slow(root / "slow" / "1" / "model.onnx")
    onnx_models.write_config(
        root / "slow",
        {
            "max_batch_size": 1,
            "dynamic_batching": {"max_queue_size": 2},
            "intra_op_threads": 1,
        },
    )
    onnx_models.mlp(root / "bare" / "1" / "model.onnx", features=8, hidden=16)
    return root


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[VolleyProcess]:
    """One server shared by the protocol tests (they do not change the repository)."""
    with serving(repository) as proc:
        yield proc


def child_processes(pid: int, marker: bytes) -> set[int]:
    """Child processes of `pid` whose command line contains `marker`.

    Found by their parent pid in /proc/*/stat: `/proc/<pid>/task/*/children` misses a child
    while the thread that started it exits and the child moves to another thread's list.
    """
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent != pid:
                continue
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):  # exited meanwhile
            continue
        if marker in cmdline:
            out.add(int(stat.parent.name))
    return out


def replace_a_worker(server: VolleyProcess) -> None:
    """Kill one of a `--workers 2` server's workers and return once its replacement, caught up
    with what the others were told, serves."""
    workers = child_processes(server.proc.pid, b"server.worker")
    assert len(workers) == 2
    os.kill(min(workers), signal.SIGKILL)
    deadline = time.monotonic() + 60
    # The supervisor passes the replacement connections only once it has caught up with the
    # others. A fixed wait for that was not always enough on a loaded machine.
    while True:
        replacements = child_processes(server.proc.pid, b"server.worker") - workers
        if replacements and takes_connections(server, replacements):
            break
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    server.wait_ready(path="/v2/health/ready")


def takes_connections(server: VolleyProcess, pids: set[int]) -> bool:
    """Whether one of two new connections is served by one of `pids` (with every worker idle,
    the supervisor passes new connections to each in turn)."""
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as client:
            client.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: volley\r\n\r\n")
            if not client.recv(4096):  # answered: the worker has it
                continue
            if holders(server, server.http_port).get(client.getsockname()[1]) in pids:
                return True
    return False


def holders(server: VolleyProcess, port: int) -> dict[int, int]:
    """For each connection the server holds on its `port`, the client's port -> the pid of the
    worker holding it (read from /proc)."""
    owners = {}
    for pid in child_processes(server.proc.pid, b"server.worker"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone meanwhile
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    owners[os.readlink(fd)] = pid
    held = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            established = state == "01" and int(local.rsplit(":", 1)[1], 16) == port
            if established and f"socket:[{inode}]" in owners:
                held[int(remote.rsplit(":", 1)[1], 16)] = owners[f"socket:[{inode}]"]
    return held


def running(pid: int) -> bool:
    """Whether any thread of process `pid` is still alive (not a zombie).

    Every thread counts: a SIGKILLed process whose main thread is already a zombie can still
    hold its sockets open until its last thread has exited.
    """
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread exited meanwhile (ESRCH)
            continue
    return any(state != "Z" for state in states)


def copy_shipped_models(folder: Path) -> Path:
    """A copy of the shipped model repository (`models/`) inside `folder`, for a test to serve."""
    repository = folder / "models"
    shutil.copytree(ROOT / "models", repository)
    return repository


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    """`volley serve` on a copy of the shipped repository, one per test module."""
    with serving(copy_shipped_models(tmp_path_factory.mktemp("shipped"))) as proc:
        yield proc
