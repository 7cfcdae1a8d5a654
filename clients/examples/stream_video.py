"""Stream a video's frames to the `detect` pipeline over gRPC, at the video's frame rate, and
print each frame's answer (processed, or skipped when the server was still busy).

    python clients/examples/stream_video.py --url localhost:8001 docs/samples/camera.mp4
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from clients import VolleyClient

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "samples" / "camera.mp4"


def frames(path: Path, max_frames: int) -> Iterator[np.ndarray]:
    """RGB frames of a video file, paced like a live camera."""
    capture = cv2.VideoCapture(str(path))
    period = 1.0 / (capture.get(cv2.CAP_PROP_FPS) or 15.0)
    try:
        for _ in range(max_frames):
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            time.sleep(period)
    finally:
        capture.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", type=Path, default=SAMPLE, help="a video file")
    parser.add_argument("--url", default="localhost:8001", help="host:port (gRPC only)")
    parser.add_argument("--max-frames", type=int, default=1_000_000)
    args = parser.parse_args()
    counts: Counter[str] = Counter()
    with VolleyClient(args.url) as client:
        for result in client.stream(frames(args.video, args.max_frames)):
            counts[result.status] += 1
            if result.status == "processed":
                ms = result.timings.get("total_us", 0) / 1000
                labels = " ".join(d.class_name for d in result.detections)
                what = f"{len(result.detections)} objects [{labels}], server {ms:.0f} ms"
            else:
                what = f"{result.status}: {result.skip_reason or result.error}"
            print(f"frame {result.id:>4}: {what}")
    print("summary:", " ".join(f"{status}={n}" for status, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
