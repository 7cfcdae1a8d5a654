"""The `volley` command line and the server's structured logs."""

from __future__ import annotations

import json
import subprocess
import sys


def test_serve_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--metrics-port",
                 "--poll-repository", "--max-request-bytes", "--shutdown-timeout",
                 "--log-level", "--host"):  # fmt: skip
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
    assert all(e["provider"] == "CPUExecutionProvider" for e in loaded)
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
