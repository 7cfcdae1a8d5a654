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
