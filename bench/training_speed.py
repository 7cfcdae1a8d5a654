"""Detector training speed: steps per second by precision and memory layout, on this CPU.

Each step is `training.detector.train.train_step`, the one the training loop runs. Batches are
random images with one box each, so only the arithmetic is measured, not the data. Prints a
markdown table.

    python bench/training_speed.py
    python bench/training_speed.py --steps 40 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import machine  # noqa: E402  (bench/serving.py, beside this script)

from training.detector.loss import build_targets  # noqa: E402
from training.detector.model import CenterNet  # noqa: E402
from training.detector.train import bf16_is_fast, train_step  # noqa: E402

INPUT_SIZE = 320
BATCH = 16
CLASSES = 10


def steps_per_second(bf16: bool, channels_last: bool, steps: int, warmup: int) -> float:
    """Timed training steps of a fresh network (after `warmup` untimed ones)."""
    torch.manual_seed(0)
    net = CenterNet(CLASSES)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    images = torch.rand(BATCH, 3, INPUT_SIZE, INPUT_SIZE).contiguous(memory_format=layout)
    grid = (INPUT_SIZE // net.stride, INPUT_SIZE // net.stride)
    boxes = [torch.tensor([[40.0, 40.0, 90.0, 100.0]])] * BATCH
    labels = [torch.tensor([3])] * BATCH
    targets = build_targets(boxes, labels, CLASSES, grid, net.stride)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        train_step(net, optimizer, images, targets, bf16)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine()}")
    print(f"torch {torch.__version__}, {args.threads} threads, AMX (fast bf16): {bf16_is_fast()}\n")
    print("| precision | layout | steps/s | images/s | steps/s vs fp32 NCHW |")
    print("|---|---|---:|---:|---:|")
    base = None
    for bf16 in (False, True):
        for channels_last in (False, True):
            rate = steps_per_second(bf16, channels_last, args.steps, args.warmup)
            base = base or rate
            precision = "bf16 autocast" if bf16 else "fp32"
            layout = "channels-last" if channels_last else "NCHW"
            speedup = rate / base
            print(f"| {precision} | {layout} | {rate:.2f} | {rate * BATCH:.0f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
