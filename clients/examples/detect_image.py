"""Detect objects in image files with the `detect` pipeline; boxes in each image's own pixels.

python clients/examples/detect_image.py --url localhost:8001 docs/samples/street-1.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clients import VolleyClient

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "samples" / "street-1.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, default=[SAMPLE], help="image files")
    parser.add_argument("--url", default="localhost:8001", help="host:port (gRPC) or http://...")
    parser.add_argument("--score-threshold", type=float, default=None)
    args = parser.parse_args()
    with VolleyClient(args.url) as client:
        found = client.detect_many(args.images, score_threshold=args.score_threshold)
    for path, detections in zip(args.images, found, strict=True):
        print(f"{path}: {len(detections)} detection(s)")
        for d in detections:
            box = ", ".join(f"{v:.0f}" for v in d.box)
            print(f"  class {d.class_name:<3} score {d.score:.2f}  box [{box}]")


if __name__ == "__main__":
    main()
