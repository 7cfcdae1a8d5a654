"""Triton's load generator, perf_analyzer, runs against Volley over HTTP and gRPC unchanged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import serving

TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "perf_analyzer"


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    """The launcher. Its absence is a missing prerequisite (skip); a launcher that is there
    but cannot fetch or start the tool is a failure, never a skip."""
    if not TOOL.exists():
        pytest.skip(f"{TOOL} (the perf_analyzer launcher) is not on this machine")
    fetch = subprocess.run([str(TOOL), "--version"], capture_output=True, text=True, timeout=600)
    assert fetch.returncode == 0, (
        f"{TOOL} is present but `--version` exited {fetch.returncode}:\n"
        f"{fetch.stdout[-2000:]}{fetch.stderr[-2000:]}"
    )
    return TOOL


@pytest.mark.parametrize(
    "protocol,extra",
    [("http", []), ("grpc", []), ("grpc", ["--streaming"]), ("http", ["-a", "-b", "4"])],
)
def test_perf_analyzer_runs_clean(perf_analyzer, server, tmp_path, protocol, extra):
    url = server.http if protocol == "http" else server.grpc
    csv = tmp_path / "out.csv"
    run = subprocess.run(
        [str(perf_analyzer), "-m", "mlp", "-u", url, "-i", protocol,
         "--concurrency-range", "4", "--measurement-interval", "1000",
         "--max-trials", "10", "--stability-percentage", "999", "-f", str(csv), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stdout.lower()
    header, row = csv.read_text().splitlines()[:2]
    assert header.startswith("Concurrency,Inferences/Second")
    assert float(row.split(",")[1]) > 0
    assert "Server:" in run.stdout  # it read /stats because Volley advertises "statistics"


def test_perf_analyzer_trace_flags_turn_tracing_on(perf_analyzer, repository, tmp_path):
    """perf_analyzer's --trace-* flags reach the server through the trace extension."""
    file = tmp_path / "trace.json"
    with serving(repository, "--trace-config", f"triton,file={file}") as server:
        run = subprocess.run(
            [str(perf_analyzer), "-m", "mlp", "-u", server.grpc, "-i", "grpc",
             "--concurrency-range", "2", "--measurement-interval", "500",
             "--max-trials", "5", "--stability-percentage", "999",
             "--trace-level", "TIMESTAMPS", "--trace-rate", "1", "--trace-count", "25"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        settings = requests.get(f"{server.url}/v2/models/mlp/trace/setting", timeout=10).json()
    assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_count"] == "0"
    heads = [r for r in json.loads(file.read_text()) if "model_name" in r]
    assert len(heads) == 25 and {h["model_name"] for h in heads} == {"mlp"}
