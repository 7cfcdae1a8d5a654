"""ONNX Runtime's own answer for a model file: what every served output must equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def ort_outputs(model_file: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model in process, on the CPU, and return its outputs by name."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


# Volley runs models on CUDA where it can; GPU kernels (TF32 matmuls, other reduction orders)
# differ from the CPU reference in the last digits, so the bar depends on where it runs.
ON_GPU = "CUDAExecutionProvider" in ort.get_available_providers()
RTOL, ATOL = (2e-3, 1e-4) if ON_GPU else (1e-5, 1e-6)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Served output equals ONNX Runtime's own result, to the precision of the device."""
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
