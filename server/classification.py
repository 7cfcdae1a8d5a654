"""Triton's classification extension: an output answered as its top classes instead of values.

A client asks for it per requested output (HTTP `"parameters": {"classification": k}`, gRPC the
`classification` int64 parameter; `tritonclient`'s `InferRequestedOutput(name, class_count=k)`).
Each row of the output (each batch entry, flattened) is answered with its k largest elements,
largest first, as BYTES strings `"<value>:<index>"`, or `"<value>:<index>:<label>"` where the
output's config names a `label_filename` (one label per line, in the model's folder): shape
`[batch, k]` (`[k]` without batching). k above the number of elements gives them all. Values
are written as Triton writes them: floats with six decimals, integers whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.config import ConfigError, ModelConfig
from server.errors import invalid

CLASSIFICATION = "classification"  # the requested output's parameter
UNCLASSIFIABLE = ("BYTES", "BOOL")  # datatypes whose elements have no order to rank by
MAX_LABEL_BYTES = 16 * 1024 * 1024
MAX_CLASSES = 2**31 - 1


def classification(value: object, output: str) -> int:
    """The `classification` parameter of a requested output, checked (0: not asked)."""
    if type(value) is not int or not 0 <= value <= MAX_CLASSES:
        raise invalid(
            f"classification of output '{output}' must be a whole number of classes from 0 "
            f"to {MAX_CLASSES}, got {value!r}"
        )
    return value


def read_labels(model_dir: Path, config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The labels of each output whose config names a `label_filename`, read from the model's
    folder (a plain file name: nothing outside the folder can be named)."""
    labels: dict[str, tuple[str, ...]] = {}
    for spec in config.outputs:
        name = spec.label_filename
        if not name:
            continue
        path = model_dir / name
        if not path.is_file() or path.stat().st_size > MAX_LABEL_BYTES:
            raise ConfigError(
                f"{path}: label_filename of output '{spec.name}' must name a file of at most "
                f"{MAX_LABEL_BYTES} bytes in the model's folder"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: labels must be UTF-8 text") from None
        labels[spec.name] = tuple(text.splitlines())
    return labels


def top_classes(data: np.ndarray, count: int, labels: tuple[str, ...], batched: bool) -> np.ndarray:
    """The `count` largest elements of each row of `data` (every batch entry, or the whole
    tensor without batching) as Triton's classification strings (bytes), largest first; ties
    keep the lower index first."""
    rows = data.reshape(data.shape[0] if batched else 1, -1)
    count = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :count]
    floating = rows.dtype.kind == "f"
    out = np.empty(order.shape, dtype=np.object_)
    for r, indices in enumerate(order):
        for c, index in enumerate(indices.tolist()):
            value = rows[r, index]
            text = f"{value:f}:{index}" if floating else f"{int(value)}:{index}"
            if index < len(labels) and labels[index]:
                text += f":{labels[index]}"
            out[r, c] = text.encode()
    return out if batched else out[0]
