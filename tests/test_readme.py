"""Every command and code example in README.md, run as a reader would run it.

The first block's two commands are run elsewhere: the install one by tests/test_install.py, the
test one by .ci/run. Every other bash line and Python example runs here, in a scratch folder
that holds the README's paths (`models/`, `docs/`), against a server on the default ports, as
the tour starts it with `volley serve &`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
DEFAULT_PORTS = (8000, 8001, 8002)
PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "perf_analyzer"


def blocks(language: str) -> list[str]:
    """The README's code blocks in `language`, in order."""
    parts = README.split(f"```{language}\n")[1:]
    return [part.split("```", 1)[0] for part in parts]


def commands() -> list[str]:
    """Every bash line after the first block, without its comment."""
    lines = [line for block in blocks("bash")[1:] for line in block.splitlines()]
    return [line.split("  #", 1)[0].strip() for line in lines if line.strip()]


# What a command is expected to do here, where that is not "exit 0": this machine has neither a
# display nor a webcam, and the client says so in one line.
EXPECTED_FAILURES = {"volley camera 0": "use --headless"}
STARTS_A_SERVER = ("volley serve", "python -m server serve")


def ports_free() -> bool:
    for port in DEFAULT_PORTS:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder with the README's relative paths; outputs land here, not in the repo."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "models", work / "models")
    (work / "docs").symlink_to(ROOT / "docs")
    return work


def run(command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def tour_server(workdir: Path) -> Iterator[subprocess.Popen]:
    """`volley serve &` of the tour, on the default ports."""
    assert ports_free(), f"the README's commands need ports {DEFAULT_PORTS} free"
    log = (workdir / "serve.log").open("wb")
    proc = subprocess.Popen(["volley", "serve"], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, workdir / "serve.log")
        yield proc
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    import time

    deadline = time.monotonic() + timeout
    while '"event":"ready"' not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_the_first_block_holds_the_install_and_the_test_command() -> None:
    first = [line for line in blocks("bash")[0].splitlines() if line.strip()]
    assert len(first) == 2


@pytest.mark.parametrize(
    "command", [c for c in commands() if not c.startswith(STARTS_A_SERVER) or "--help" in c]
)
def test_readme_command(command: str, workdir: Path, tour_server: subprocess.Popen) -> None:
    if command.startswith("../shared/tools/perf_analyzer"):
        if not PERF_ANALYZER.exists():
            pytest.skip(f"{PERF_ANALYZER} is not beside this checkout")
        result = run(command, ROOT)
    else:
        result = run(command, workdir)
    if command in EXPECTED_FAILURES:
        assert result.returncode == 1, result
        assert EXPECTED_FAILURES[command] in result.stderr
        return
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{command} printed nothing"
    if "--json" in command and command.startswith("volley detect"):
        (image,) = json.loads(result.stdout)
        assert image["detections"] and (workdir / "annotated" / "street-1.jpg").exists()
    if command.startswith("volley camera") and "--headless" in command:
        assert (workdir / "camera.avi").stat().st_size > 0
        assert (workdir / "frames.jsonl").read_text().count('"processed"') > 0


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_example(index: int, workdir: Path, tour_server: subprocess.Popen) -> None:
    script = workdir / f"example_{index}.py"
    script.write_text(blocks("python")[index])
    result = run(f"{sys.executable} {script}", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith(STARTS_A_SERVER)
                                     and "--help" not in c and not c.endswith("&")])  # fmt: skip
def test_readme_serve_variant(command: str, workdir: Path, tour_server: subprocess.Popen) -> None:
    """Each `volley serve` line starts and gets ready (on other ports: the tour's server runs)."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    moved = command
    for default, port in zip(DEFAULT_PORTS, ports, strict=True):
        moved = moved.replace(str(default), str(port))
    flags = "" if "--http-port" in command else (
        f" --http-port {ports[0]} --grpc-port {ports[1]} --metrics-port {ports[2]}"
    )  # fmt: skip
    log_path = workdir / f"serve-{ports[0]}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["bash", "-c", f"exec {moved}{flags}"], cwd=workdir,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_ready(proc, log_path)
        finally:
            proc.terminate()
            assert proc.wait(60) == 0, log_path.read_text()
