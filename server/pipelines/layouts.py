"""Detector output layouts: recognising them, and reading one image's raw output as candidates.

- `volley`:  [K, 6] rows (x1, y1, x2, y2, score, class), Volley's own detector (peak-picked in
  the graph, no IoU NMS yet);
- `end2end`: the same rows from exports that already ran NMS (YOLOv10, YOLO26 style);
- `yolov8`:  [4 + C, A] columns (cx, cy, w, h, then C class scores; YOLOv8/YOLO11 exports);
- `yolov5`:  [A, 5 + C] rows (cx, cy, w, h, objectness, then C class scores).
Boxes come out in detector-input pixels.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np

from server.config import ConfigError

NEEDS_NMS = {"volley": True, "end2end": False, "yolov8": True, "yolov5": True}
MAX_END2END_ROWS = 1000  # end-to-end exports keep a few hundred rows; raw YOLO heads thousands


@dataclass
class Candidates:
    """Detections of one image: xyxy boxes [M, 4], scores [M], integer class ids [M]."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray


def detect_layout(dims: tuple[int, ...], metadata: dict[str, str]) -> str:
    """The layout of a detector output with per-image `dims`, from its shape and metadata."""
    if len(dims) != 2 or any(d <= 0 for d in dims):
        raise ConfigError(
            f"cannot tell the layout of a detector output of per-image shape {list(dims)}: "
            "set 'layout' in config.yaml"
        )
    rows, cols = dims
    if metadata.get("end2end", "").lower() == "true" or (cols == 6 and rows <= MAX_END2END_ROWS):
        return "end2end"
    return "yolov8" if rows < cols else "yolov5"


def class_count(layout: str, dims: tuple[int, ...]) -> int | None:
    """How many classes the layout's shape implies (None where the shape does not say)."""
    if layout == "yolov8":
        return dims[0] - 4
    if layout == "yolov5":
        return dims[1] - 5
    return None


def check_dims(layout: str, dims: tuple[int, ...]) -> None:
    """Refuse a configured layout that the output shape cannot hold."""
    fits = len(dims) == 2 and (
        (layout in ("volley", "end2end") and dims[1] == 6)
        or (layout == "yolov8" and dims[0] > 4)
        or (layout == "yolov5" and dims[1] > 5)
    )
    if not fits:
        raise ConfigError(f"layout '{layout}' does not fit a per-image output of {list(dims)}")


def metadata_class_names(metadata: dict[str, str]) -> tuple[str, ...] | None:
    """Class names from ONNX metadata: Ultralytics' `names` dict, or Volley's `classes` list."""
    if "names" in metadata:
        try:
            names = ast.literal_eval(metadata["names"])
        except (ValueError, SyntaxError):
            return None
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            return tuple(str(names.get(i, i)) for i in range(max(names) + 1))
        if isinstance(names, list | tuple):
            return tuple(str(n) for n in names)
        return None
    if "classes" in metadata:
        return tuple(name.strip() for name in metadata["classes"].split(","))
    return None


def metadata_input_size(metadata: dict[str, str]) -> tuple[int, int] | None:
    """(height, width) from Ultralytics' `imgsz` ([h, w]) or Volley's `input_size` metadata."""
    for key in ("imgsz", "input_size"):
        if key not in metadata:
            continue
        try:
            value = ast.literal_eval(metadata[key])
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, int):
            return value, value
        if isinstance(value, list | tuple) and len(value) == 2:
            return int(value[0]), int(value[1])
    return None


def read_candidates(layout: str, output: np.ndarray, score_threshold: float) -> Candidates:
    """One image's raw output -> the candidates scoring at least `score_threshold`."""
    if layout in ("volley", "end2end"):
        rows = output[output[:, 4] >= score_threshold]
        return Candidates(
            rows[:, :4].astype(np.float32), rows[:, 4].astype(np.float32),
            rows[:, 5].astype(np.int64),
        )  # fmt: skip
    if layout == "yolov8":
        table = output.T
        class_scores = table[:, 4:]
    else:  # yolov5: class confidence = objectness x class probability
        table = output
        class_scores = table[:, 5:] * table[:, 4:5]
    class_ids = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(class_ids)), class_ids]
    keep = scores >= score_threshold
    cx, cy, w, h = table[keep, :4].T
    boxes = np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=1)
    return Candidates(boxes.astype(np.float32), scores[keep].astype(np.float32), class_ids[keep])
