"""Test images for the detection pipeline: held-out synthetic scenes at several sizes and shapes.

The training generator draws square 320x320 scenes. Cropping one to a smaller rectangle (keeping
only the objects wholly inside it) and scaling it up gives a photo of another size and aspect
ratio whose ground-truth boxes are known exactly in its own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from training.detector.synth import SceneSpec, make_scene

SCENE_SIDE = 320


@dataclass
class SceneImage:
    """An RGB uint8 image [H, W, 3] with its objects' xyxy boxes (its own pixels) and class ids."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


def scene_image(
    seed: int, crop: tuple[int, int] = (SCENE_SIDE, SCENE_SIDE), scale: float = 1.0
) -> SceneImage:
    """A held-out scene cropped to `crop` = (width, height) <= 320 and scaled by `scale`."""
    rng = np.random.default_rng([seed, 7])
    sample = make_scene(rng, SceneSpec(size=SCENE_SIDE), "test")
    width, height = crop
    x0 = int(rng.integers(0, SCENE_SIDE - width + 1))
    y0 = int(rng.integers(0, SCENE_SIDE - height + 1))
    image = sample.image[y0 : y0 + height, x0 : x0 + width]
    boxes = sample.boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    inside = (
        (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
    )
    boxes, labels = boxes[inside], sample.labels[inside]
    if scale != 1.0:
        size = (round(width * scale), round(height * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        boxes = boxes * np.array(
            [size[0] / width, size[1] / height, size[0] / width, size[1] / height], np.float32
        )
    return SceneImage(np.ascontiguousarray(image), boxes, labels)


def encode(image: np.ndarray, ext: str = ".jpg", quality: int = 95) -> bytes:
    """An RGB image encoded as JPEG/PNG/WebP/BMP bytes (by extension)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    assert ok, ext
    return buf.tobytes()


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a [M,4] and b [K,4] -> [M,K]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def matched_fraction(
    truth: SceneImage, boxes: np.ndarray, labels: np.ndarray, iou: float = 0.5
) -> float:
    """Share of ground-truth objects with a detection of the same class at IoU >= `iou`."""
    if len(truth.boxes) == 0:
        return 1.0
    overlaps = box_iou(truth.boxes, np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    same = truth.labels[:, None] == np.asarray(labels).reshape(1, -1)
    return float(((overlaps >= iou) & same).any(axis=1).mean())
