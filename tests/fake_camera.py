"""A fake camera for Chromium: a YUV4MPEG2 video of synthetic digit scenes.

Chromium plays the file in a loop as its camera with `--use-fake-device-for-media-stream
--use-file-for-fake-video-capture=<file>.y4m`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
from vision_scenes import scene_image


def write_y4m(
    path: Path, scenes: int = 3, hold: int = 15, fps: int = 15, size: tuple[int, int] = (320, 240)
) -> Path:
    """Write `scenes` held-out scenes with at least one digit each, `hold` frames each (4:2:0)."""
    width, height = size
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        seed = 0
        for _ in range(scenes):
            while len((scene := scene_image(seed, crop=size)).labels) == 0:
                seed += 1
            seed += 1
            frame = b"FRAME\n" + cv2.cvtColor(scene.image, cv2.COLOR_RGB2YUV_I420).tobytes()
            out.write(frame * hold)
    return path
