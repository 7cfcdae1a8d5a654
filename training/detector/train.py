"""The training loop: AdamW with a one-cycle learning rate over in-memory uint8 images."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from training.detector.coco import DetectionSet
from training.detector.evaluate import images_to_input
from training.detector.loss import Targets, build_targets, detection_loss
from training.detector.model import CenterNet


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    epochs: int
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast for the forward pass (losses stay float32)


def bf16_is_fast() -> bool:
    """Whether this CPU has AMX tiles, where bfloat16 convolutions run about twice as fast."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@dataclass(frozen=True)
class Batch:
    """Model input [B,3,S,S] in 0..1 with per-image xyxy boxes and class ids."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]


def epoch_batches(data: DetectionSet, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
    """One pass over the data in a random order; the last partial batch is dropped."""
    order = rng.permutation(len(data))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield Batch(
            images=torch.from_numpy(images_to_input(data.images[index])),
            boxes=[torch.from_numpy(data.boxes[i]) for i in index],
            labels=[torch.from_numpy(data.labels[i]) for i in index],
        )


def train_step(
    net: CenterNet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: Targets,
    bf16: bool,
) -> dict[str, float]:
    """One update: forward (bf16 autocast if asked), float32 losses, backward, optimizer step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        heat_logits, distances = net(images)
    loss, parts = detection_loss(heat_logits.float(), distances.float(), targets, net.stride)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return parts


def train(net: CenterNet, data: DetectionSet, config: TrainConfig) -> dict[str, float]:
    """Train `net` in place; returns the wall time, step count and last losses."""
    batch_size = min(config.batch_size, len(data))
    steps_per_epoch = len(data) // batch_size
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.learning_rate, total_steps=total, pct_start=config.warmup_fraction
    )
    rng = np.random.default_rng(config.seed)
    grid = (data.images.shape[1] // net.stride, data.images.shape[2] // net.stride)
    # NCHW on purpose: channels-last trains 16 % faster on this CPU, but two full runs of it gave
    # different models (bench/RESULTS.md), and the same command must give the same model.
    net.train()
    start = time.perf_counter()
    parts: dict[str, float] = {}
    with tqdm(total=total, desc="training", unit="step") as progress:
        for _ in range(config.epochs):
            for batch in epoch_batches(data, batch_size, rng):
                targets = build_targets(
                    batch.boxes, batch.labels, net.num_classes, grid, net.stride
                )
                parts = train_step(net, optimizer, batch.images, targets, config.bf16)
                schedule.step()
                progress.update()
                progress.set_postfix({k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
    net.eval()
    seconds = time.perf_counter() - start
    return {
        "train_seconds": round(seconds, 1),
        "steps": total,
        "images_per_s": round(total * batch_size / seconds, 1),
    } | {f"final_{k}_loss": round(v, 4) for k, v in parts.items()}
