"""`volley detect IMAGE...`: detections for image files from a running server's `detect` model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clients.vision import (
    ImageDetections,
    VisionError,
    default_server,
    detect_files,
    detect_parameters,
)


def format_table(results: list[ImageDetections]) -> str:
    """One row per detection: image, class, score, box (x1,y1,x2,y2 in the image's pixels)."""
    rows = [("image", "class", "score", "box")]
    for result in results:
        if not result.detections:
            rows.append((result.path, "-", "-", "(no detections)"))
        for det in result.detections:
            box = ",".join(f"{v:.1f}" for v in det.box)
            rows.append((result.path, det.class_name, f"{det.score:.3f}", box))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"
        for row in rows
    )


def save_annotated(results: list[ImageDetections], folder: Path) -> list[Path]:
    """Annotated copies of the images in `folder`, under their own file names."""
    import cv2
    import numpy as np

    from clients.draw import draw_detections

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        source = Path(result.path)
        target = folder / source.name
        if target.resolve() == source.resolve():
            raise VisionError(f"{target}: refusing to overwrite the input image")
        data = np.frombuffer(source.read_bytes(), dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            raise VisionError(f"{source}: cannot decode the image again for --save")
        draw_detections(image, result.detections)
        try:
            ok = cv2.imwrite(str(target), image)
        except cv2.error:
            ok = False
        if not ok:  # an extension OpenCV cannot write: fall back to PNG
            target = target.with_suffix(".png")
            if not cv2.imwrite(str(target), image):
                raise VisionError(f"{target}: cannot write the annotated image")
        written.append(target)
    return written


def run(args: argparse.Namespace) -> int:
    """Run `volley detect` with parsed arguments; 0 on success, 1 on any error."""
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        print("error: --score-threshold must be between 0 and 1", file=sys.stderr)
        return 1
    params = detect_parameters(score_threshold=args.score_threshold, classes=args.classes)
    server = args.server or default_server(args.protocol)
    try:
        results = detect_files(args.images, server, args.protocol, args.model, params)
        if args.save is not None:
            save_annotated(results, args.save)
    except VisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(format_table(results))
    return 0
