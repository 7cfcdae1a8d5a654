"""ONNX export and PyTorch/ONNX Runtime parity check shared by every training script."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

OPSET = 17
PARITY_TOLERANCE = 1e-4  # relative, see `relative_difference`
MAGNITUDE_FLOOR = 0.1  # below it, differences are judged against 0.1 (absolute 1e-5)

PARITY_RULE = "limit 1e-4; magnitudes below 0.1 count as 0.1"  # the two above, for model cards

Compare = Callable[[np.ndarray, np.ndarray], float]


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


def relative_difference(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|have - want| / max(|want|, MAGNITUDE_FLOOR), element-wise.

    Below the floor a relative error means nothing (a score of 1e-7 against 2e-7 is "100 %" off),
    so small magnitudes are judged against the floor: an absolute 1e-5 at tolerance 1e-4.
    """
    have, want = have.astype(np.float64), want.astype(np.float64)
    return np.abs(have - want) / np.maximum(np.abs(want), MAGNITUDE_FLOOR)


def elementwise_difference(have: np.ndarray, want: np.ndarray) -> float:
    """Largest relative difference of two same-shaped outputs (0 for equal integers/bools)."""
    if want.dtype.kind in "biu":
        return 0.0 if np.array_equal(have, want) else float("inf")
    return float(relative_difference(have, want).max(initial=0.0))


def check_parity(
    model: torch.nn.Module,
    path: Path,
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: Sequence[int] = (1, 3, 8),
    tolerance: float = PARITY_TOLERANCE,
    compare: Compare = elementwise_difference,
) -> float:
    """Compare PyTorch and ONNX Runtime outputs on fresh inputs; raise if any differs.

    `compare(onnx_output, torch_output)` measures the difference of one output (by default the
    largest element-wise `relative_difference`). Returns the largest difference seen, which is
    at most `tolerance`.
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
        for name, want, have in zip(session.get_outputs(), expected, got, strict=True):
            if have.shape != tuple(want.shape):
                raise AssertionError(
                    f"ONNX output {name.name!r} has shape {have.shape} at batch {batch}, "
                    f"PyTorch {tuple(want.shape)}"
                )
            difference = compare(have, want.numpy())
            if not difference <= tolerance:
                raise AssertionError(
                    f"ONNX output {name.name!r} differs from PyTorch at batch {batch}: "
                    f"relative difference {difference:.3g} > {tolerance:g}"
                )
            worst = max(worst, difference)
    return worst


def next_version(model_dir: Path) -> int:
    """The version folder a new run writes: one past the newest, so no model is overwritten
    and a server polling the repository picks the new one up without a restart."""
    if not model_dir.is_dir():
        return 1
    numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(numbers, default=0) + 1
