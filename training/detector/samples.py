"""Sample inputs for trying the detector: photos and a short video of held-out scenes.

    python -m training.detector.samples docs/samples

writes `street-1.jpg`, `street-2.jpg` (640x480 and 480x640) and `camera.mp4` (6 s, 320x240,
15 FPS, each scene held for 1.5 s), all drawn from the held-out split with a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from training.detector.synth import SceneSpec, make_scene


def scene(seed: int, width: int, height: int, scale: float) -> np.ndarray:
    """A held-out 320x320 scene cropped to (width, height) and scaled, as BGR."""
    rng = np.random.default_rng([seed, 99])
    image = make_scene(rng, SceneSpec(), "test").image[:height, :width]
    size = (round(width * scale), round(height * scale))
    return cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), cv2.COLOR_RGB2BGR)


def write_samples(out: Path) -> list[Path]:
    """Write the sample photos and video into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    photos = [(out / "street-1.jpg", scene(1, 320, 240, 2.0)), (out / "street-2.jpg",
              scene(2, 240, 320, 2.0))]  # fmt: skip
    for path, image in photos:
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    video = out / "camera.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 15, (320, 240))
    for seed in range(10, 14):
        frame = scene(seed, 320, 240, 1.0)
        for _ in range(22):
            writer.write(frame)
    writer.release()
    return [path for path, _ in photos] + [video]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the samples into")
    for path in write_samples(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
