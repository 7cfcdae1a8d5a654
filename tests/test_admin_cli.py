"""`volley models`, `volley infer` and `volley bench` on a real server with the shipped models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from conftest import ROOT, VolleyProcess
from reference import assert_close, ort_outputs

SHIPPED = ROOT / "models"
PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "perf_analyzer"
FRAUD_CONFIG = yaml.safe_load((SHIPPED / "fraud" / "config.yaml").read_text())
WIDTH = len(FRAUD_CONFIG["parameters"]["feature_names"].split(","))  # the raw columns
FEATURES = np.random.default_rng(7).standard_normal((3, WIDTH)).astype(np.float32) * 10


def volley(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m server ARGS...`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def table(text: str, first: str) -> list[dict[str, str]]:
    """The rows of the printed table whose header starts with `first`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1 :] if line.strip()]
    return [dict(zip(header, row, strict=False)) for row in rows]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def fraud_request() -> dict:
    rows = [[float(v) for v in row] for row in FEATURES]  # nested rows, as a person writes them
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [3, WIDTH], "data": rows}]}


@pytest.mark.parametrize(
    "command,options",
    [
        (
            ["models"],
            [
                "--server",
                "--protocol",
                "--json",
                "list",
                "load",
                "unload",
                "stats",
                "--with-dependents",
            ],
        ),
        (["infer"], ["--json", "--server", "--protocol", "--model-version"]),
        (["bench"], ["--concurrency", "--seconds", "--protocol", "--perf-analyzer", "--builtin"]),
    ],
)
def test_help_lists_the_options(command: list[str], options: list[str]) -> None:
    run = volley(*command, "--help")
    assert run.returncode == 0, run.stderr
    assert all(option in run.stdout for option in options), run.stdout


def test_models_lists_state_and_version(shipped: VolleyProcess) -> None:
    run = volley("models", "--server", shipped.http)
    assert run.returncode == 0, run.stderr
    rows = {row["name"]: row for row in table(run.stdout, "name")}
    for name in ("fraud", "detector", "detect"):
        assert (rows[name]["version"], rows[name]["state"]) == ("1", "READY")
    listed = json.loads(volley("models", "list", "--json", "--protocol", "grpc",
                               "--server", shipped.grpc).stdout)  # fmt: skip
    assert {(m["name"], m["version"], m["state"]) for m in listed} == {
        ("fraud", "1", "READY"), ("detector", "1", "READY"), ("detect", "1", "READY"),
    }  # fmt: skip


def test_unload_then_load(shipped: VolleyProcess) -> None:
    grpc = ["--protocol", "grpc", "--server", shipped.grpc]
    assert volley("models", "unload", "fraud", *grpc).returncode == 0
    rows = {row["name"]: row for row in table(volley("models", *grpc).stdout, "name")}
    assert rows["fraud"]["state"] == "UNAVAILABLE"
    assert rows["fraud"]["reason"] == "unloaded"
    assert volley("models", "load", "fraud", "--server", shipped.http).returncode == 0
    listed = json.loads(volley("models", "list", "fraud", "--json", *grpc).stdout)
    assert listed == [{"name": "fraud", "version": "1", "state": "READY", "reason": ""}]


def test_unload_with_dependents_takes_the_detector_too(shipped: VolleyProcess) -> None:
    run = volley("models", "unload", "detect", "--with-dependents", "--server", shipped.http)
    assert run.returncode == 0 and "detect: unloaded with its dependents" in run.stdout
    rows = {row["name"]: row for row in table(volley("models", "--server", shipped.http).stdout,
                                              "name")}  # fmt: skip
    assert rows["detect"]["state"] == rows["detector"]["state"] == "UNAVAILABLE"
    assert rows["fraud"]["state"] == "READY"
    for name in ("detector", "detect"):
        assert volley("models", "load", name, "--server", shipped.http).returncode == 0


def test_stats_counts_inferences(shipped: VolleyProcess) -> None:
    def fraud_stats() -> dict:
        run = volley("models", "stats", "fraud", "--json", "--server", shipped.http)
        assert run.returncode == 0, run.stderr
        (stats,) = json.loads(run.stdout)
        return stats

    before = fraud_stats()
    client = httpclient.InferenceServerClient(shipped.http)
    features = httpclient.InferInput("features", [1, WIDTH], "FP32")
    features.set_data_from_numpy(FEATURES[:1])
    for _ in range(5):
        client.infer("fraud", [features])
    after = fraud_stats()
    assert after["inference_count"] == before["inference_count"] + 5
    assert after["success"] == before["success"] + 5
    assert after["execution_count"] > before["execution_count"]
    assert after["fail"] == 0 and after["mean_batch"] >= 1
    run = volley("models", "stats", "--protocol", "grpc", "--server", shipped.grpc)
    rows = {row["model"]: row for row in table(run.stdout, "model")}
    assert {"fraud", "detector", "detect"} <= set(rows)
    assert number(rows["fraud"]["inferences"]) >= after["inference_count"]
    assert number(rows["fraud"]["avg compute ms"]) > 0


def test_infer_from_file_and_stdin_matches_onnxruntime(
    shipped: VolleyProcess, tmp_path: Path
) -> None:
    want = ort_outputs(SHIPPED / "fraud" / "1" / "model.onnx", {"features": FEATURES})
    request = tmp_path / "request.json"
    request.write_text(json.dumps(fraud_request()))
    runs = [
        volley("infer", "fraud", "--json", str(request), "--server", shipped.http),
        volley("infer", "fraud", "--json", "-", "--protocol", "grpc", "--server", shipped.grpc,
               stdin=json.dumps(fraud_request())),
    ]  # fmt: skip
    for run in runs:
        assert run.returncode == 0, run.stderr
        answer = json.loads(run.stdout)
        assert (answer["model_name"], answer["model_version"]) == ("fraud", "1")
        outputs = {out["name"]: out for out in answer["outputs"]}
        assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["shape"] == [3, 1]
        score = np.array(outputs["score"]["data"], dtype=np.float32).reshape(3, 1)
        assert_close(score, want["score"])
        assert outputs["is_fraud"]["data"] == want["is_fraud"].reshape(-1).tolist()


def _wrong_shape() -> str:
    body = fraud_request()
    body["inputs"][0].update(shape=[1, 19], data=list(range(19)))
    return json.dumps(body)


@pytest.mark.parametrize(
    "model,body,message",
    [
        ("fraud", '{"inputs": [', "invalid JSON"),
        ("fraud", '{"inputs": [{"name": "features", "shape": [1, 20]}]}', "missing 'datatype'"),
        ("nope", json.dumps(fraud_request()), "nope"),
        ("fraud", _wrong_shape(), "[1, 19]"),
    ],
)
def test_infer_errors_are_one_line(
    shipped: VolleyProcess, model: str, body: str, message: str
) -> None:
    run = volley("infer", model, "--json", "-", "--server", shipped.http, stdin=body)
    assert run.returncode == 1
    assert run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: ") and message in run.stderr, run.stderr


def test_bench_builtin_on_fraud(shipped: VolleyProcess) -> None:
    run = volley("bench", "fraud", "--builtin", "--seconds", "2", "--concurrency", "2",
                 "--server", shipped.http)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (row,) = table(run.stdout, "requests")
    assert number(row["errors"]) == 0 and number(row["requests"]) > 0
    assert number(row["req/s"]) > 0
    assert 0 < number(row["p50 ms"]) <= number(row["p99 ms"]) <= number(row["max ms"])


def test_bench_builtin_on_detect_sends_images(shipped: VolleyProcess) -> None:
    run = volley("bench", "detect", "--builtin", "--seconds", "1", "--concurrency", "1",
                 "--protocol", "grpc", "--server", shipped.grpc)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (row,) = table(run.stdout, "requests")
    assert number(row["errors"]) == 0 and number(row["req/s"]) > 0


def test_bench_runs_perf_analyzer(shipped: VolleyProcess) -> None:
    if not PERF_ANALYZER.exists():
        pytest.skip(f"{PERF_ANALYZER} is not on this machine")
    fetch = subprocess.run(
        [str(PERF_ANALYZER), "--version"], capture_output=True, text=True, timeout=600
    )
    if fetch.returncode != 0:
        pytest.skip(f"perf_analyzer could not be fetched: {fetch.stderr[-500:]}")
    run = volley("bench", "fraud", "--perf-analyzer", str(PERF_ANALYZER), "--seconds", "1",
                 "--concurrency", "2", "--server", shipped.http)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "perf_analyzer" in run.stdout
    (row,) = table(run.stdout, "req/s")
    assert number(row["req/s"]) > 0 and number(row["p99 ms"]) > 0
