"""The `volley` command line and the server's structured logs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from conftest import serving
from reference import ON_GPU


def test_serve_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--metrics-port",
                 "--poll-repository", "--max-request-bytes", "--shutdown-timeout",
                 "--log-level", "--host", "--model-control", "--load-model",
                 "--strict-readiness", "--workers", "--http-keepalive-timeout"):  # fmt: skip
        assert flag in out
    assert "(default: 8000)" in out and "(default: models)" in out


def test_console_script_is_installed():
    out = subprocess.run(["volley", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("volley ")


def test_logs_are_json_lines_naming_the_execution_provider(server):
    events = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert events, server.log()
    loaded = [e for e in events if e.get("event") == "model_loaded"]
    assert {(e["model"], e["version"]) for e in loaded} >= {("mlp", 1), ("mlp", 2), ("slow", 1)}
    # The shared models keep the default preference, [cuda, cpu]: CUDA wherever this
    # onnxruntime build offers it, else the CPU.
    expected = "CUDAExecutionProvider" if ON_GPU else "CPUExecutionProvider"
    assert {e["provider"] for e in loaded} == {expected}, loaded
    # Staged in page-locked buffers and padded to one batch shape on a GPU only.
    assert {(e["staged"], e["padded"]) for e in loaded if e["model"] == "mlp"} == {(ON_GPU,) * 2}
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)


def serve_error(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "serve", *flags],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_port_in_use_is_one_clear_line_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flag in ("--http-port", "--grpc-port", "--metrics-port"):
            run = serve_error(
                "--model-repository", str(tmp_path), "--host", "127.0.0.1", flag, port
            )
            assert run.returncode == 1
            lines = run.stderr.strip().splitlines()
            assert len(lines) == 1, run.stderr
            assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and flag in lines[0]


def test_a_missing_repository_is_an_error_and_an_empty_one_a_warning(tmp_path: Path) -> None:
    run = serve_error("--model-repository", str(tmp_path / "nowhere"))
    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"volley serve: error: model repository '{tmp_path / 'nowhere'}' does not exist "
        "(set it with --model-repository)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with serving(empty) as proc:
        assert '"event":"empty_repository"' in proc.log()


def test_train_help_shows_each_models_options() -> None:
    out = subprocess.run(["volley", "train", "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout  # fmt: skip
    assert "usage: volley train fraud" in out and "usage: volley train detector" in out
    for flag in ("--quick", "--data", "--coco", "--out", "--seed", "--epochs", "--precision"):
        assert flag in out
    assert "runs/quick/fraud" in out and "never over an existing one" in out
