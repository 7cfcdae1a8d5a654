"""ONNX export and PyTorch/ONNX Runtime parity check shared by every training script."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

OPSET = 17


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: Sequence[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export `model` with a dynamic batch dimension, attach metadata and validate the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dynamic = {input_name: {0: "batch"}} | {name: {0: "batch"} for name in output_names}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=list(output_names),
        dynamic_axes=dynamic,
        opset_version=OPSET,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def check_parity(
    model: torch.nn.Module,
    path: Path,
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: Sequence[int] = (1, 3, 8),
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Compare PyTorch and ONNX Runtime outputs on fresh inputs; raise if any differs.

    Returns the largest relative difference seen (|a-b| / (|b| + atol)).
    """
    model.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    for batch in batch_sizes:
        x = make_input(batch)
        with torch.no_grad():
            expected = model(x)
        expected = expected if isinstance(expected, tuple | list) else (expected,)
        got = session.run(None, {input_name: x.numpy()})
        for want, have in zip(expected, got, strict=True):
            want = want.numpy()
            if want.dtype.kind in "biu":
                if not np.array_equal(want, have):
                    raise AssertionError(f"ONNX integer/bool output differs at batch {batch}")
                continue
            np.testing.assert_allclose(have, want, rtol=rtol, atol=atol)
            rel = float(np.max(np.abs(have - want) / (np.abs(want) + atol), initial=0.0))
            worst = max(worst, rel)
    return worst
