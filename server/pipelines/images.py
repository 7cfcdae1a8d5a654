"""Image bytes and pixels to detector input: header check, decode, letterbox.

Nothing is decoded before its header has been read and its size checked, so a small file that
declares a gigapixel image costs nothing. Decoding is OpenCV's (it releases the GIL).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import invalid

# Pillow only reads headers here, and the size check below is the pipeline's own (configurable);
# Pillow's process-wide bomb limit would refuse large declared sizes with its own error first.
Image.MAX_IMAGE_PIXELS = None

# Pillow names of the formats the pipeline takes (MPO: the multi-picture JPEG of many cameras).
FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP"}


@dataclass
class Letterboxed:
    """A detector-sized image and how it maps back: original = (letterboxed - pad) / scale."""

    pixels: np.ndarray  # uint8 [H, W, 3] RGB, the detector's input size
    scale: float
    pad_x: int
    pad_y: int
    width: int  # original size
    height: int


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from an encoded image's header, without decoding its pixels."""
    if not data:
        raise invalid(f"{what}: empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:
            kind, size = header.format, header.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise invalid(f"{what}: not a JPEG, PNG, WebP or BMP image") from None
    if kind not in FORMATS:
        raise invalid(f"{what}: {kind} images are not supported; send JPEG, PNG, WebP or BMP")
    return size


def decode_image(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> uint8 RGB [H, W, 3], after checking the declared size."""
    width, height = image_size(data, what)
    check_size(width, height, what, max_pixels)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.shape[:2] != (height, width):
        raise invalid(f"{what}: the image data is truncated or corrupt")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_size(width: int, height: int, what: str, max_pixels: int) -> None:
    """Refuse empty images and images over `max_pixels`."""
    if width <= 0 or height <= 0:
        raise invalid(f"{what}: zero-sized image ({width}x{height})")
    if width * height > max_pixels:
        raise invalid(
            f"{what}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}"
        )


def letterbox(rgb: np.ndarray, height: int, width: int, pad_value: int) -> Letterboxed:
    """Scale to fit (height, width) keeping the aspect ratio, and centre it on padding."""
    h, w = rgb.shape[:2]
    scale = min(height / h, width / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    out = cv2.copyMakeBorder(
        rgb, pad_y, height - new_h - pad_y, pad_x, width - new_w - pad_x,
        cv2.BORDER_CONSTANT, value=(pad_value, pad_value, pad_value),
    )  # fmt: skip
    return Letterboxed(out, scale, pad_x, pad_y, w, h)


def to_chw_float(images: list[Letterboxed], pixel_scale: float) -> np.ndarray:
    """Stack letterboxed images into the detector's float32 [N, 3, H, W] input."""
    batch = np.stack([item.pixels for item in images])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(
        pixel_scale
    )
