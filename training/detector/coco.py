"""COCO instances data sets on disk: write one, and read one into memory for training.

Layout (what `--coco PATH` expects, and what the synthetic generator writes)::

    PATH/
      annotations.json   # COCO "instances": images, annotations (bbox = [x, y, w, h]), categories
      images/000000.jpg  # any format OpenCV reads; `file_name` is relative to PATH (or PATH/images)

PATH may also be the annotation file itself, with `file_name` relative to its folder.
Categories are sorted by id and numbered 0..C-1 in that order (the model's class ids).
Crowd annotations (`iscrowd: 1`) are skipped. Images are resized to a square without letterbox,
and boxes are scaled with them, so detections come out in the resized image's pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

ANNOTATION_FILE = "annotations.json"
IMAGE_DIR = "images"


@dataclass(frozen=True)
class Sample:
    """One image with its objects: uint8 RGB [H,W,3], float32 xyxy boxes [M,4], int64 ids [M]."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class DetectionSet:
    """Square images (uint8 [N,S,S,3] RGB) with per-image xyxy boxes and 0-based class ids."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int]) -> DetectionSet:
        """The images at `index`, in that order."""
        return DetectionSet(
            images=self.images[np.asarray(index, dtype=np.int64)],
            boxes=[self.boxes[i] for i in index],
            labels=[self.labels[i] for i in index],
            class_names=self.class_names,
        )


def write_coco(root: Path, samples: Iterable[Sample], class_names: Sequence[str]) -> Path:
    """Write images as JPEG under root/images and their boxes to root/annotations.json."""
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        file_name = f"{IMAGE_DIR}/{image_id:06d}.jpg"
        bgr = cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(root / file_name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"cannot write {root / file_name}")
        height, width = sample.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), label in zip(
            sample.boxes.tolist(), sample.labels.tolist(), strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
    path = root / ANNOTATION_FILE
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def annotation_file(path: Path) -> Path:
    """The annotation file for a data set path: the file itself or PATH/annotations.json."""
    file = path / ANNOTATION_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no COCO annotation file at {file}")
    return file


def _image_path(root: Path, file_name: str) -> Path:
    for candidate in (root / file_name, root / IMAGE_DIR / file_name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image {file_name!r} not found under {root} or {root / IMAGE_DIR}")


def load_coco(path: Path, size: int) -> DetectionSet:
    """Read a COCO data set, resizing every image to size x size and scaling its boxes."""
    file = annotation_file(path)
    coco = json.loads(file.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    records = sorted(coco["images"], key=lambda r: r["id"])
    images = np.empty((len(records), size, size, 3), dtype=np.uint8)
    all_boxes, all_labels = [], []
    for i, record in enumerate(tqdm(records, desc=f"reading {file.parent.name}", leave=False)):
        bgr = cv2.imread(str(_image_path(file.parent, record["file_name"])), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"OpenCV cannot read image {record['file_name']!r}")
        height, width = bgr.shape[:2]
        interpolation = cv2.INTER_AREA if max(height, width) > size else cv2.INTER_LINEAR
        images[i] = cv2.cvtColor(
            cv2.resize(bgr, (size, size), interpolation=interpolation), cv2.COLOR_BGR2RGB
        )
        anns = by_image.get(record["id"], [])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = np.clip(boxes * np.array([size / width, size / height] * 2, np.float32), 0, size)
        labels = np.array([class_of[a["category_id"]] for a in anns], dtype=np.int64)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        all_boxes.append(boxes[keep])
        all_labels.append(labels[keep])
    return DetectionSet(images, all_boxes, all_labels, [str(c["name"]) for c in categories])
