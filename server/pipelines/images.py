"""Image bytes and pixels to detector input: header check, decode, letterbox.

Nothing is decoded before its header has been read and its size checked, so a small file that
declares a gigapixel image costs nothing. Decoding is OpenCV's (it releases the GIL).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from server.copies import join_rows
from server.errors import invalid

# Pillow only reads headers here, and the size check below is the pipeline's own (configurable);
# Pillow's process-wide bomb limit would refuse large declared sizes with its own error first.
Image.MAX_IMAGE_PIXELS = None

# Pillow names of the formats the pipeline takes (MPO: the multi-picture JPEG of many cameras).
FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP"}
EXIF_ORIENTATION = 0x0112


@dataclass
class Letterboxed:
    """A detector-sized image and how it maps back: original = (letterboxed - pad) / scale."""

    pixels: np.ndarray  # uint8 [H, W, 3] RGB, the detector's input size
    scale: float
    pad_x: int
    pad_y: int
    width: int  # original size
    height: int


def image_header(data: bytes, what: str) -> tuple[str, int, int]:
    """(format, width, height) from an encoded image's header, without decoding its pixels.

    The size is the upright image's: OpenCV applies the EXIF orientation when it decodes, and
    orientations 5 to 8 (a phone held upright, say) swap width and height.
    """
    if not data:
        raise invalid(f"{what}: empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:
            kind, (width, height) = header.format, header.size
            if _orientation(header) in (5, 6, 7, 8):
                width, height = height, width
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise invalid(f"{what}: not a JPEG, PNG, WebP or BMP image") from None
    if kind not in FORMATS:
        raise invalid(f"{what}: {kind} images are not supported; send JPEG, PNG, WebP or BMP")
    return FORMATS[kind], width, height


def _orientation(header: Image.Image) -> int:
    """The EXIF orientation tag (1: upright); 1 as well when the EXIF block cannot be read.

    Read from the EXIF block found with the header, never with `getexif()`: for a PNG that
    decodes the whole image first, whatever size its header declares.
    """
    raw = header.info.get("exif")
    if not isinstance(raw, bytes):
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        orientation = exif.get(EXIF_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block: OpenCV ignores it too
        return 1
    return orientation if isinstance(orientation, int) else 1


@dataclass
class Decoded:
    """Decoded pixels (uint8 RGB [h, w, 3], maybe reduced) and the image's own size."""

    rgb: np.ndarray
    width: int
    height: int


def decode_image(
    data: bytes, what: str, max_pixels: int, fit: tuple[int, int] | None = None
) -> Decoded:
    """Encoded bytes -> RGB pixels, after checking the declared size.

    With `fit` = (height, width), a JPEG that will be shrunk to fit it anyway is decoded at
    1/2, 1/4 or 1/8 scale straight from its DCT coefficients (libjpeg's scaled decoding), which
    costs a fraction of a full decode and a resize.
    """
    kind, width, height = image_header(data, what)
    check_size(width, height, what, max_pixels)
    factor = reduction(width, height, fit) if kind == "JPEG" else 1
    try:
        rgb = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), REDUCED_FLAGS[factor])
    except cv2.error:
        rgb = None
    expected = (-(-height // factor), -(-width // factor))
    if rgb is None or rgb.shape[:2] != expected:
        raise invalid(f"{what}: the image data is truncated or corrupt")
    return Decoded(rgb, width, height)


def _rgb(flags: int) -> int:
    """OpenCV decode flags that give RGB instead of BGR (no second pass to swap channels)."""
    return flags & ~cv2.IMREAD_COLOR | cv2.IMREAD_COLOR_RGB


REDUCED_FLAGS = {
    1: _rgb(cv2.IMREAD_COLOR),
    2: _rgb(cv2.IMREAD_REDUCED_COLOR_2),
    4: _rgb(cv2.IMREAD_REDUCED_COLOR_4),
    8: _rgb(cv2.IMREAD_REDUCED_COLOR_8),
}


def reduction(width: int, height: int, fit: tuple[int, int] | None) -> int:
    """The largest decode reduction (1, 2, 4, 8) that still leaves at least the fitted size."""
    if fit is None:
        return 1
    scale = min(fit[0] / height, fit[1] / width)
    return max((r for r in REDUCED_FLAGS if r * scale <= 1), default=1)


def check_size(width: int, height: int, what: str, max_pixels: int) -> None:
    """Refuse empty images and images over `max_pixels`."""
    if width <= 0 or height <= 0:
        raise invalid(f"{what}: zero-sized image ({width}x{height})")
    if width * height > max_pixels:
        raise invalid(
            f"{what}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}"
        )


def letterbox(
    rgb: np.ndarray, height: int, width: int, pad_value: int, size: tuple[int, int] | None = None
) -> Letterboxed:
    """Scale to fit (height, width) keeping the aspect ratio, and centre it on padding.

    `size` = (width, height) of the original image when `rgb` was decoded at a reduced scale.
    The image is scaled (or copied) straight into a new canvas of the padding colour: one
    OpenCV call that lets the GIL go, at most (`server/copies.py` says why that counts).
    """
    w, h = size or (rgb.shape[1], rgb.shape[0])
    scale = min(height / h, width / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    out = padding_canvas(height, width, pad_value)
    inside = out[pad_y : pad_y + new_h, pad_x : pad_x + new_w]
    if (new_w, new_h) != rgb.shape[1::-1]:
        interpolation = cv2.INTER_AREA if new_w < rgb.shape[1] else cv2.INTER_LINEAR
        scaled = cv2.resize(rgb, (new_w, new_h), dst=inside, interpolation=interpolation)
        if scaled is not inside:  # OpenCV made its own array: copy it in
            join_rows([scaled], inside)
    else:
        join_rows([rgb], inside)
    return Letterboxed(out, scale, pad_x, pad_y, w, h)


@lru_cache(maxsize=8)
def _padding_bytes(height: int, width: int, pad_value: int) -> bytes:
    return bytes([pad_value]) * (height * width * 3)


def padding_canvas(height: int, width: int, pad_value: int) -> np.ndarray:
    """A new uint8 [height, width, 3] image of the padding colour (one memory copy that keeps
    the GIL, where `np.full` may let it go)."""
    canvas = bytearray(_padding_bytes(height, width, pad_value))
    return np.frombuffer(canvas, dtype=np.uint8).reshape(height, width, 3)
