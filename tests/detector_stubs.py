"""Tiny ONNX "detectors" of each output layout that answer every image with fixed raw rows.

They take FP32 [N, 3, H, W] and return the same given table for every image, so a test knows
exactly which boxes the pipeline must report, where, and after which NMS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def fixed_output_detector(
    path: Path,
    table: np.ndarray,
    input_size: tuple[int, int] = (64, 64),
    metadata: dict[str, str] | None = None,
    static_batch: bool = False,
) -> Path:
    """Write a detector whose output for each image is `table` (its per-image output)."""
    height, width = input_size
    batch: int | str = 1 if static_batch else "batch"
    table = np.asarray(table, dtype=np.float32)
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "rest"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["table", "out_shape"], ["raw"]),
    ]
    inits = [
        numpy_helper.from_array(table[None], "table"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(table.shape, np.int64), "rest"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_output_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, height, width])],
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, [batch, *table.shape])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def yolov8_table(boxes: list[tuple], classes: int, anchors: int = 32) -> np.ndarray:
    """[4 + C, A]: each (cx, cy, w, h, class, score) in its own anchor column, the rest empty."""
    table = np.zeros((4 + classes, anchors), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        table[:4, i] = (cx, cy, w, h)
        table[4 + cls, i] = score
    return table


def yolov5_table(boxes: list[tuple], classes: int, anchors: int = 32) -> np.ndarray:
    """[A, 5 + C]: each (cx, cy, w, h, objectness, class, class probability) in its own row."""
    table = np.zeros((anchors, 5 + classes), np.float32)
    for i, (cx, cy, w, h, obj, cls, prob) in enumerate(boxes):
        table[i, :5] = (cx, cy, w, h, obj)
        table[i, 5 + cls] = prob
    return table


def rows_table(rows: list[tuple], k: int = 16) -> np.ndarray:
    """[K, 6]: (x1, y1, x2, y2, score, class) rows, then empty rows."""
    table = np.zeros((k, 6), np.float32)
    table[: len(rows)] = rows
    return table
