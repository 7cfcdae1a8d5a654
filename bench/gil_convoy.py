"""What joining a batch's rows costs beside threads that run Python (the GIL convoy).

numpy lets the GIL go for every copy of more than 500 elements; getting it back waits up to
Python's switch interval (5 ms) while another thread runs Python, as Volley's event loop and
decode threads do under load. A batch thread that joins N images with `np.concatenate` waits up
to N times. `server.copies.join_rows` copies them while holding the GIL. This prints, for 0, 1
and 3 threads spinning in Python, the time to join 1, 6 and 12 letterboxed 320x320 RGB images
each way; no threads spinning is the ceiling. Then the same for what a decode thread does per
camera frame (`decode_image` + `letterbox` of a 640x480 JPEG), with the GIL waits that implies.

    python bench/gil_convoy.py
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

import numpy as np
from serving import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from vision_scenes import encode, scene_image  # noqa: E402

from server.copies import join_rows  # noqa: E402
from server.pipelines.images import decode_image, letterbox  # noqa: E402

CALLS = 60


def spin(stop: threading.Event) -> None:
    """Run Python bytecode until told to stop (it takes the GIL whenever it may)."""
    count = 0
    while not stop.is_set():
        count += 1


def timed(fn, calls: int = CALLS) -> np.ndarray:
    """Milliseconds per call of `fn`."""
    times = []
    for _ in range(calls):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return np.array(times)


class Spinners:
    """`count` threads running Python for as long as the `with` block lasts."""

    def __init__(self, count: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=spin, args=(self.stop,)) for _ in range(count)]

    def __enter__(self) -> None:
        for thread in self.threads:
            thread.start()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def frame_table() -> list[str]:
    """A decode thread's work per camera frame, alone and beside a thread running Python."""
    frames = [encode(scene_image(seed, (320, 240), 2.0).image, quality=80) for seed in range(8)]
    turn = itertools.count()

    def prepare() -> None:
        decoded = decode_image(frames[next(turn) % 8], "frame", 40_000_000, fit=(320, 320))
        letterbox(decoded.rgb, 320, 320, 114, (decoded.width, decoded.height))

    lines = ["| threads running Python | decode + letterbox p50 / p90 ms |", "|---:|---|"]
    for spinners in (0, 1):
        with Spinners(spinners):
            ms = timed(prepare, 200)
        lines.append(f"| {spinners} | {np.median(ms):.3f} / {np.percentile(ms, 90):.3f} |")
    return lines


def main() -> int:
    images = [
        np.random.default_rng(i).integers(0, 256, (1, 320, 320, 3), np.uint8) for i in range(12)
    ]
    out = np.empty((16, 320, 320, 3), np.uint8)
    ways = {
        "np.concatenate": lambda parts: np.concatenate(parts, out=out[: len(parts)]),
        "join_rows": lambda parts: join_rows(parts, out[: len(parts)]),
    }
    print(f"Machine: {machine()}, switch interval {sys.getswitchinterval() * 1e3:g} ms\n")
    print("| threads running Python | images joined | np.concatenate p50 / p90 ms | "
          "join_rows p50 / p90 ms |")  # fmt: skip
    print("|---:|---:|---|---|")
    for spinners in (0, 1, 3):
        with Spinners(spinners):
            for count in (1, 6, 12):
                cells = []
                for join in ways.values():
                    ms = timed(lambda join=join, count=count: join(images[:count]))
                    cells.append(f"{np.median(ms):.3f} / {np.percentile(ms, 90):.3f}")
                print(f"| {spinners} | {count} | {' | '.join(cells)} |")
    print("", *frame_table(), sep="\n")
    np.testing.assert_array_equal(out[:12], np.concatenate(images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
