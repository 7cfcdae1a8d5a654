"""From candidates to answers: request options, class filter, per-class NMS, original pixels."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from server.errors import invalid
from server.pipelines.config import DetectionConfig
from server.pipelines.images import Letterboxed
from server.pipelines.layouts import Candidates


@dataclass(frozen=True)
class DetectOptions:
    """What one request asks of the pipeline (its parameters over the config's defaults)."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: frozenset[int] | None
    bgr: bool


def detect_options(
    parameters: dict, config: DetectionConfig, class_names: tuple[str, ...]
) -> DetectOptions:
    """Read and check the request parameters that tune detection."""
    order = str(parameters.get("channel_order", "rgb")).lower()
    if order not in ("rgb", "bgr"):
        raise invalid(f"parameter 'channel_order' must be 'rgb' or 'bgr', got {order!r}")
    return DetectOptions(
        score_threshold=_number(parameters, "score_threshold", config.score_threshold, 0.0, 1.0),
        iou_threshold=_number(parameters, "iou_threshold", config.iou_threshold, 0.0, 1.0),
        max_detections=int(
            _number(parameters, "max_detections", config.max_detections, 1, 10_000, integer=True)
        ),
        classes=_class_filter(parameters.get("classes"), class_names),
        bgr=order == "bgr",
    )


def _number(
    parameters: dict, key: str, default: float, low: float, high: float, integer: bool = False
) -> float:
    value = parameters.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer and number != int(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        kind = "an integer" if integer else "a number"
        raise invalid(f"parameter '{key}' must be {kind}, got {value!r}") from None
    if not low <= number <= high:
        raise invalid(f"parameter '{key}' must be between {low:g} and {high:g}, got {value!r}")
    return number


def _class_filter(value: object, class_names: tuple[str, ...]) -> frozenset[int] | None:
    """`classes`: comma-separated names or ids -> the set of class ids to keep."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise invalid(f"parameter 'classes' must be a comma-separated string, got {value!r}")
    by_name = {name: i for i, name in enumerate(class_names)}
    keep = set()
    for item in str(value).split(","):
        item = item.strip()
        if item in by_name:
            keep.add(by_name[item])
        elif item.isascii() and item.isdigit() and int(item) < len(class_names):  # not '²'
            keep.add(int(item))
        else:
            raise invalid(
                f"parameter 'classes': unknown class {item!r}; the model has {list(class_names)}"
            )
    return frozenset(keep)


def select(found: Candidates, options: DetectOptions, nms: bool) -> Candidates:
    """Class filter, per-class NMS (where the model has not done it), best `max_detections`."""
    keep = found.scores >= options.score_threshold
    if options.classes is not None:
        keep &= np.isin(found.class_ids, list(options.classes))
    boxes, scores, ids = found.boxes[keep], found.scores[keep], found.class_ids[keep]
    if nms and len(scores):
        xywh = np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), axis=1)
        picked = cv2.dnn.NMSBoxesBatched(
            xywh.astype(np.float64), scores.astype(np.float64), ids.astype(np.int32),
            options.score_threshold, options.iou_threshold,
        )  # fmt: skip
        order = np.asarray(picked, dtype=np.int64).reshape(-1)
    else:
        order = np.arange(len(scores))
    order = order[np.argsort(-scores[order], kind="stable")][: options.max_detections]
    return Candidates(boxes[order], scores[order], ids[order])


def to_original(found: Candidates, image: Letterboxed) -> Candidates:
    """Boxes from detector-input pixels back to the original image's pixels, clipped to it."""
    offset = np.array([image.pad_x, image.pad_y] * 2, dtype=np.float32)
    boxes = (found.boxes - offset) / np.float32(image.scale)
    limit = np.array([image.width, image.height] * 2, dtype=np.float32)
    boxes = np.clip(boxes, 0, limit)
    return Candidates(boxes, found.scores, found.class_ids)


def pack(results: list[Candidates], class_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-image detections -> the pipeline's padded output tensors ([N], [N, K, ...])."""
    n = len(results)
    k = max((len(r.scores) for r in results), default=0)
    counts = np.zeros(n, dtype=np.int32)
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    scores = np.zeros((n, k), dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int32)
    names = np.full((n, k), b"", dtype=np.object_)
    for i, found in enumerate(results):
        m = len(found.scores)
        counts[i] = m
        boxes[i, :m], scores[i, :m], ids[i, :m] = found.boxes, found.scores, found.class_ids
        names[i, :m] = [_name(class_names, c).encode() for c in found.class_ids]
    return {
        "num_detections": counts,
        "boxes": boxes,
        "scores": scores,
        "class_ids": ids,
        "class_names": names,
    }


def _name(class_names: tuple[str, ...], class_id: int) -> str:
    return class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id)
