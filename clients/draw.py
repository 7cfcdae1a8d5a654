"""Drawing detections and a status line on BGR images with OpenCV."""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from functools import cache

import cv2
import numpy as np

from clients.vision import Detection

FONT = cv2.FONT_HERSHEY_SIMPLEX


@cache
def class_color(class_id: int) -> tuple[int, int, int]:
    """A bright BGR colour per class, the same on every run (golden-ratio hue steps)."""
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return (int(b * 255), int(g * 255), int(r * 255))


def _scale(image: np.ndarray) -> tuple[float, int]:
    """Font scale and line thickness suited to the image size."""
    side = min(image.shape[0], image.shape[1])
    font_scale = max(0.35, side / 700.0)
    return font_scale, max(1, round(side / 300.0))


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = background
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def _label(
    image: np.ndarray,
    text: str,
    x: int,
    y: int,
    color: tuple[int, int, int],
    font_scale: float,
    below: bool = False,
) -> None:
    """Text on a filled box whose bottom-left corner is (x, y) (top-left when `below`)."""
    thickness = max(1, round(font_scale * 2))
    (w, h), base = cv2.getTextSize(text, FONT, font_scale, thickness)
    height, width = image.shape[:2]
    x = int(min(max(x, 0), max(width - w - 2, 0)))
    top = y if below else y - h - base - 2
    top = int(min(max(top, 0), max(height - h - base - 2, 0)))
    cv2.rectangle(image, (x, top), (x + w + 2, top + h + base + 2), color, cv2.FILLED)
    cv2.putText(
        image, text, (x + 1, top + h + 1), FONT, font_scale, _text_color(color), thickness,
        cv2.LINE_AA,
    )  # fmt: skip


def draw_detections(image: np.ndarray, detections: Iterable[Detection]) -> np.ndarray:
    """Boxes and "label score" captions drawn in place on a BGR uint8 image; returns it."""
    font_scale, thickness = _scale(image)
    for det in detections:
        color = class_color(det.class_id)
        p1 = (round(det.x1), round(det.y1))
        p2 = (round(det.x2), round(det.y2))
        cv2.rectangle(image, p1, p2, color, thickness, cv2.LINE_AA)
        _label(image, f"{det.class_name or det.class_id} {det.score:.2f}", p1[0], p1[1], color,
               font_scale)  # fmt: skip
    return image


def status_text(
    fps: float | None = None, latency_ms: float | None = None, extra: str | None = None
) -> str:
    """The status line, e.g. "12.3 FPS | 45 ms | reconnecting"."""
    parts = []
    if fps is not None:
        parts.append(f"{fps:.1f} FPS")
    if latency_ms is not None:
        parts.append(f"{latency_ms:.0f} ms")
    if extra:
        parts.append(extra)
    return " | ".join(parts)


def draw_status(
    image: np.ndarray,
    fps: float | None = None,
    latency_ms: float | None = None,
    extra: str | None = None,
) -> np.ndarray:
    """A status line (FPS, end-to-end latency, extra text) in the top-left corner, in place."""
    text = status_text(fps, latency_ms, extra)
    if text:
        font_scale, _ = _scale(image)
        _label(image, text, 0, 0, (32, 32, 32), font_scale, below=True)
    return image
