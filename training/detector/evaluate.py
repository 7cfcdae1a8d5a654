"""Quality and speed: COCO mAP with pycocotools, and ONNX Runtime CPU latency."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from training.detector.coco import DetectionSet

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 [N,3,S,S] images -> [N,K,6] detections


def images_to_input(images: np.ndarray) -> np.ndarray:
    """uint8 RGB [N,H,W,3] -> the model input: float32 [N,3,H,W] in 0..1."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def predict(predictor: Predictor, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Run `predictor` over uint8 images in batches; returns all detections [N,K,6]."""
    chunks = [
        predictor(images_to_input(images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with a fixed number of intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predictor(path: Path, threads: int) -> Predictor:
    """A predictor running the exported graph with ONNX Runtime on the CPU."""
    session = cpu_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _quiet(fn: Callable, *args: object) -> object:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def coco_ground_truth(data: DetectionSet) -> COCO:
    """The data set as an in-memory pycocotools COCO object (image ids 1..N, category ids 1..C)."""
    size = data.images.shape[1]
    annotations = []
    for image_id, (boxes, labels) in enumerate(zip(data.boxes, data.labels, strict=True), 1):
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": size, "height": size} for i in range(1, len(data) + 1)],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(data.class_names)],
    }
    _quiet(gt.createIndex)
    return gt


def coco_map(data: DetectionSet, detections: np.ndarray) -> dict[str, float]:
    """COCO bbox mAP@0.5 and mAP@0.5:0.95 of [N,K,6] detections against the data set's boxes."""
    gt = coco_ground_truth(data)
    rows = [
        [image_id, x1, y1, x2 - x1, y2 - y1, score, int(class_id) + 1]
        for image_id, per_image in enumerate(detections, 1)
        for x1, y1, x2, y2, score, class_id in per_image.tolist()
        if score > 0
    ]
    if not rows:
        return {"map50": 0.0, "map50_95": 0.0}
    evaluator = COCOeval(gt, _quiet(gt.loadRes, np.array(rows, dtype=np.float64)), "bbox")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return {"map50": float(evaluator.stats[1]), "map50_95": float(evaluator.stats[0])}


def ort_latency(
    path: Path, size: int, threads: int, batch_sizes: tuple[int, ...] = (1, 8), runs: int = 20
) -> dict:
    """Median ONNX Runtime CPU latency per batch (ms) and throughput (images/s) at each size."""
    session = cpu_session(path, threads)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    out: dict = {"threads": threads}
    for batch in batch_sizes:
        x = rng.random((batch, 3, size, size), dtype=np.float32)
        for _ in range(3):
            session.run(None, {name: x})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - start)
        ms = float(np.median(times) * 1000)
        out[f"batch_{batch}"] = {
            "ms_per_batch": round(ms, 2),
            "images_per_s": round(batch * 1000 / ms, 1),
        }
    return out
