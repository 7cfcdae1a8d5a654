"""The README's two commands: the first installs and serves without PyTorch; CI runs the second."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from conftest import ROOT, VolleyProcess, copy_shipped_models

SERVE = " && volley serve"


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without their comments."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command() -> None:
    install, tests = readme_commands()[:2]
    assert install.endswith(SERVE)
    assert tests.endswith("python -m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_install_serves_the_shipped_models_without_torch(tmp_path: Path) -> None:
    install = readme_commands()[0].removesuffix(SERVE)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
           "VIRTUAL_ENV": str(env_dir), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    subprocess.run(["bash", "-c", install], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=900)  # fmt: skip
    python = env_dir / "bin" / "python"
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, env=env)
    assert no_torch.returncode != 0 and b"No module named 'torch'" in no_torch.stderr
    assert shutil.which("volley", path=env["PATH"]) == str(env_dir / "bin" / "volley")

    repository = copy_shipped_models(tmp_path)
    proc = VolleyProcess(repository, python=str(python))
    try:
        proc.wait_models()
        client = httpclient.InferenceServerClient(proc.http)
        assert {m["name"]: m["state"] for m in client.get_model_repository_index()} == {
            "detect": "READY", "detector": "READY", "fraud": "READY"}  # fmt: skip
        features = httpclient.InferInput("features", [2, 17], "FP32")  # the 17 raw columns
        features.set_data_from_numpy(np.ones((2, 17), np.float32))
        assert client.infer("fraud", [features]).as_numpy("score").shape == (2, 1)
        image = httpclient.InferInput("images", [1], "BYTES")
        sample = (ROOT / "docs" / "samples" / "street-1.jpg").read_bytes()
        image.set_data_from_numpy(np.array([sample], dtype=np.object_))
        assert client.infer("detect", [image]).as_numpy("num_detections")[0] > 0
        client.close()
    finally:
        assert proc.stop() == 0
