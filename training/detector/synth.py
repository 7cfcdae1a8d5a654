"""Synthetic detection scenes: scikit-learn handwritten digits pasted onto scikit-image photos.

Every scene is a random crop of a real photograph with random clutter shapes, then up to
`max_objects` digits at random positions, sizes, rotations and colours. Later digits may cover
earlier ones, but no digit loses more than `max_occluded` of its pixels. Sensor noise and blur
finish the image. The box of a digit is the tight box around its rendered pixels. Scenes are
drawn in chunks, each from its own `numpy.random.Generator` seeded by (seed, split, chunk), so a
seed reproduces the data set exactly however many processes draw it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import skimage.data
from sklearn.datasets import load_digits
from tqdm import tqdm

from training.detector.coco import Sample, write_coco

CLASS_NAMES = tuple(str(d) for d in range(10))
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "text",
)
GLYPH_UPSAMPLE = 4  # the 8x8 digit is smoothed at 4x before it is warped into the scene
GLYPH_PAD = 2  # empty border (in 8x8 pixels) so rotated strokes are not cut off
ALPHA_THRESHOLD = 0.3  # a pixel belongs to a digit where its coverage is at least this
TEST_FRACTION = 0.2  # share of the scikit-learn digit samples kept for held-out scenes
SCENES_PER_CHUNK = 100  # one random generator and one unit of parallel work

Split = Literal["train", "test"]


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn; sizes are in pixels of the square output image."""

    size: int = 320
    max_objects: int = 20
    min_side: float = 18.0  # nominal side of the 8x8 digit frame; tight boxes are ~0.7-1x this
    max_side: float = 68.0
    max_rotation_deg: float = 20.0
    max_occluded: float = 0.3
    max_clutter: int = 4
    max_noise_sigma: float = 8.0


@cache
def photos() -> tuple[np.ndarray, ...]:
    """The background photographs shipped inside scikit-image, as uint8 RGB arrays."""
    out = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo pairs: keep the left view
            image = image[0]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(image[:, :, :3], dtype=np.uint8))
    return tuple(out)


@cache
def digits(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Digit glyphs (float32 [M,8,8] in 0..1) and labels of one fixed split of the sklearn set."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    n_test = int(len(order) * TEST_FRACTION)
    keep = order[:n_test] if split == "test" else order[n_test:]
    return (data.images[keep] / 16.0).astype(np.float32), data.target[keep].astype(np.int64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a random photo, resized to size x size, with colour jitter (float32)."""
    photo = photos()[rng.integers(len(photos()))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.3, 1.0) * min(h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = cv2.flip(crop, 1)
    gain = (
        rng.uniform(0.6, 1.4, size=3) if rng.random() < 0.5 else np.full(3, rng.uniform(0.6, 1.4))
    )
    return np.clip(crop.astype(np.float32) * gain + rng.uniform(-30, 30), 0, 255)


def _clutter(image: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Draw random lines, circles and rectangles that the detector has to ignore."""
    size = image.shape[0]
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        thickness = int(rng.integers(1, 5))
        p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
        p2 = tuple(int(v) for v in rng.integers(0, size, size=2))
        kind = rng.integers(3)
        if kind == 0:
            cv2.line(image, p1, p2, colour, thickness, cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(image, p1, int(rng.integers(5, 40)), colour, thickness, cv2.LINE_AA)
        else:
            cv2.rectangle(image, p1, p2, colour, thickness, cv2.LINE_AA)


def _glyph_alpha(glyph: np.ndarray, side: float, angle: float, aspect: float) -> np.ndarray:
    """Coverage (float32 0..1) of one digit scaled to `side`, rotated and stretched."""
    padded = np.pad(glyph, GLYPH_PAD)
    src_size = padded.shape[0] * GLYPH_UPSAMPLE
    smooth = cv2.resize(padded, (src_size, src_size), interpolation=cv2.INTER_CUBIC)
    scale = side / (glyph.shape[0] * GLYPH_UPSAMPLE)
    rad = np.deg2rad(angle)
    rot = np.array([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])
    linear = rot @ np.diag([scale * aspect, scale / aspect])
    corners = np.array([[0, 0], [src_size, 0], [0, src_size], [src_size, src_size]]) - 0.5
    mapped = corners @ linear.T
    origin = np.floor(mapped.min(0))
    out_w, out_h = (np.ceil(mapped.max(0)) - origin + 1).astype(int)
    matrix = np.hstack([linear, -origin[:, None]]).astype(np.float32)
    alpha = cv2.warpAffine(smooth, matrix, (int(out_w), int(out_h)), flags=cv2.INTER_LINEAR)
    return np.clip(alpha, 0.0, 1.0)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour whose brightness differs clearly from the pixels it will cover."""
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    background = float(under.reshape(-1, 3).mean(0) @ luma)
    for _ in range(10):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if abs(float(colour @ luma) - background) >= 70:
            return colour
    return np.full(3, 0.0 if background > 127 else 255.0, dtype=np.float32)


class _Canvas:
    """A scene under construction: the image, which object owns each pixel, boxes and labels."""

    def __init__(self, image: np.ndarray, max_occluded: float) -> None:
        self.image = image
        self.owner = np.full(image.shape[:2], -1, dtype=np.int32)
        self.area: list[int] = []
        self.visible: list[int] = []
        self.boxes: list[list[float]] = []
        self.labels: list[int] = []
        self.max_occluded = max_occluded

    def try_paste(
        self, alpha: np.ndarray, label: int, x: int, y: int, rng: np.random.Generator
    ) -> bool:
        """Paste a digit with its top-left corner at (x, y) unless it hides too much of another."""
        size = self.image.shape[0]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + alpha.shape[1], size), min(y + alpha.shape[0], size)
        alpha = alpha[y0 - y : y1 - y, x0 - x : x1 - x]
        mask = alpha >= ALPHA_THRESHOLD
        if not mask.any():
            return False
        owners = self.owner[y0:y1, x0:x1]
        covered = owners[mask]
        lost = np.bincount(covered[covered >= 0], minlength=len(self.area))
        remaining = np.array(self.visible, dtype=np.int64) - lost
        if np.any(remaining < (1.0 - self.max_occluded) * np.array(self.area)):
            return False
        region = self.image[y0:y1, x0:x1]
        colour = _contrasting_colour(rng, region[mask])
        a = alpha[:, :, None]
        region[:] = region * (1.0 - a) + colour * a
        owners[mask] = len(self.area)
        self.visible = [int(v) for v in remaining] + [int(mask.sum())]
        self.area.append(int(mask.sum()))
        ys, xs = np.nonzero(mask)
        self.boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        self.labels.append(label)
        return True


def make_scene(rng: np.random.Generator, spec: SceneSpec, split: Split) -> Sample:
    """Draw one scene: uint8 RGB image, xyxy float32 boxes and int64 class ids."""
    glyphs, glyph_labels = digits(split)
    canvas = _Canvas(_background(rng, spec.size), spec.max_occluded)
    _clutter(canvas.image, rng, int(rng.integers(0, spec.max_clutter + 1)))
    wanted = int(rng.integers(1, spec.max_objects + 1))
    for _ in range(4 * wanted):
        if len(canvas.labels) == wanted:
            break
        pick = rng.integers(len(glyphs))
        side = float(np.exp(rng.uniform(np.log(spec.min_side), np.log(spec.max_side))))
        angle = rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg)
        alpha = _glyph_alpha(glyphs[pick], side, angle, float(np.exp(rng.uniform(-0.15, 0.15))))
        ys, xs = np.nonzero(alpha >= ALPHA_THRESHOLD)
        x = int(rng.integers(-xs.min(), spec.size - xs.max()))
        y = int(rng.integers(-ys.min(), spec.size - ys.max()))
        canvas.try_paste(alpha, int(glyph_labels[pick]), x, y, rng)
    image = canvas.image
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    sigma = rng.uniform(0, spec.max_noise_sigma)
    image = image + sigma * rng.standard_normal(size=image.shape, dtype=np.float32)
    return Sample(
        image=np.clip(image, 0, 255).astype(np.uint8),
        boxes=np.array(canvas.boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(canvas.labels, dtype=np.int64),
    )


def _chunk(index: int, n: int, seed: int, split: Split, spec: SceneSpec) -> list[Sample]:
    """Scenes `index * SCENES_PER_CHUNK` up to `n`, from the chunk's own generator."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    count = min(SCENES_PER_CHUNK, n - index * SCENES_PER_CHUNK)
    return [make_scene(rng, spec, split) for _ in range(count)]


def scenes(
    n: int, seed: int, split: Split, spec: SceneSpec = SceneSpec(), workers: int = 1
) -> Iterator[Sample]:
    """`n` reproducible scenes from `seed`, in order, drawn by `workers` processes.

    Test scenes use digit samples never seen in training. The scenes do not depend on `workers`.
    """
    draw = partial(_chunk, n=n, seed=seed, split=split, spec=spec)
    chunks = range(-(-n // SCENES_PER_CHUNK))
    if workers <= 1 or len(chunks) <= 1:
        for index in chunks:
            yield from draw(index)
        return
    # spawn, not fork: the parent may already run torch/OpenMP threads, which fork does not copy
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        for chunk in pool.map(draw, chunks):
            yield from chunk


def write_synthetic_coco(
    root: Path,
    n: int,
    seed: int,
    split: Split,
    spec: SceneSpec = SceneSpec(),
    workers: int = 1,
) -> Path:
    """Write `n` scenes as a COCO data set under `root` (drawn by `workers` processes).

    Returns the annotation file.
    """
    drawn = scenes(n, seed, split, spec, workers)
    progress = tqdm(drawn, total=n, desc=f"drawing {split} scenes")
    return write_coco(root, progress, list(CLASS_NAMES))
