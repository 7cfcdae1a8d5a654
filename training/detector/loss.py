"""Training targets and losses (CenterNet heatmap focal loss + TTFNet-style GIoU box loss).

Every object puts a Gaussian on its class heatmap, peaking at exactly 1 on the cell holding its
centre (sigma proportional to the box size). Box regression is trained on the cells in the central
part of the box, weighted by that Gaussian, so a box learns from many cells rather than one;
where objects overlap, the smaller one owns the cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.detector.decode import cell_centres, distances_to_boxes

GAUSSIAN_FRACTION = 0.54  # Gaussian sigma = this * box side / 6; also the box-loss region size
BOX_LOSS_WEIGHT = 5.0


@dataclass(frozen=True)
class Targets:
    """Dense targets on the output grid: heatmap [B,C,H,W], boxes [B,H*W,4], weights [B,H*W]."""

    heatmap: torch.Tensor
    boxes: torch.Tensor
    weight: torch.Tensor


def build_targets(
    boxes: list[torch.Tensor],
    labels: list[torch.Tensor],
    num_classes: int,
    grid: tuple[int, int],
    stride: int,
) -> Targets:
    """Targets for a batch from per-image xyxy pixel boxes [M,4] and class ids [M]."""
    batch, (height, width) = len(boxes), grid
    most = max(1, max(len(b) for b in boxes))
    device = boxes[0].device
    padded = torch.zeros(batch, most, 4, device=device)
    classes = torch.zeros(batch, most, dtype=torch.long, device=device)
    valid = torch.zeros(batch, most, dtype=torch.bool, device=device)
    for i, (b, c) in enumerate(zip(boxes, labels, strict=True)):
        padded[i, : len(b)], classes[i, : len(c)], valid[i, : len(b)] = b, c, True
    x1, y1, x2, y2 = padded.unbind(-1)
    size_x, size_y = (x2 - x1).clamp(min=1.0), (y2 - y1).clamp(min=1.0)
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    cell_x = (centre_x / stride).floor().clamp(0, width - 1)
    cell_y = (centre_y / stride).floor().clamp(0, height - 1)
    sigma_x = GAUSSIAN_FRACTION * size_x / (6 * stride)
    sigma_y = GAUSSIAN_FRACTION * size_y / (6 * stride)
    dx = torch.arange(width, dtype=torch.float32, device=device) - cell_x.unsqueeze(-1)
    dy = torch.arange(height, dtype=torch.float32, device=device) - cell_y.unsqueeze(-1)
    gauss_x = torch.exp(-(dx**2) / (2 * sigma_x.unsqueeze(-1) ** 2))
    gauss_y = torch.exp(-(dy**2) / (2 * sigma_y.unsqueeze(-1) ** 2))
    gauss = (gauss_y.unsqueeze(-1) * gauss_x.unsqueeze(-2)).flatten(2) * valid.unsqueeze(-1)

    heatmap = torch.zeros(batch * num_classes, height * width, device=device)
    rows = (torch.arange(batch, device=device).unsqueeze(1) * num_classes + classes)[valid]
    picked = gauss[valid]
    heatmap.scatter_reduce_(0, rows.unsqueeze(1).expand_as(picked), picked, "amax")

    xs, ys = cell_centres(height, width, stride, device)
    inside = (
        (xs - centre_x.unsqueeze(-1)).abs() <= GAUSSIAN_FRACTION * size_x.unsqueeze(-1) / 2
    ) & ((ys - centre_y.unsqueeze(-1)).abs() <= GAUSSIAN_FRACTION * size_y.unsqueeze(-1) / 2)
    region = (inside | (gauss == 1.0)) & valid.unsqueeze(-1)
    area = size_x * size_y
    cell_weight = gauss * region
    cell_weight = cell_weight * (area.log() / cell_weight.sum(-1).clamp(min=1e-6)).unsqueeze(-1)
    priority = torch.where(region, area.unsqueeze(-1), torch.full_like(gauss, float("inf")))
    owner = priority.argmin(1, keepdim=True)
    weight = cell_weight.gather(1, owner).squeeze(1) * region.any(1)
    target_boxes = padded.gather(1, owner.transpose(1, 2).expand(-1, -1, 4))
    return Targets(heatmap.view(batch, num_classes, height, width), target_boxes, weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of object centres."""
    prob = torch.sigmoid(logits)
    positive = target.eq(1.0)
    pos = (1 - prob) ** 2 * F.logsigmoid(logits)
    neg = (1 - target) ** 4 * prob**2 * F.logsigmoid(-logits)
    total = torch.where(positive, pos, neg).sum()
    return -total / positive.sum().clamp(min=1)


def giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching xyxy boxes [P,4] -> [P]."""
    inter_wh = (
        torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])
    ).clamp(min=0)
    inter = inter_wh.prod(-1)
    area_pred = (pred[:, 2:] - pred[:, :2]).prod(-1)
    area_target = (target[:, 2:] - target[:, :2]).prod(-1)
    union = area_pred + area_target - inter
    hull = (
        torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])
    ).prod(-1)
    return inter / union - (hull - union) / hull


def detection_loss(
    heat_logits: torch.Tensor, distances: torch.Tensor, targets: Targets, stride: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (for logging) for one batch."""
    height, width = heat_logits.shape[-2:]
    xs, ys = cell_centres(height, width, stride, heat_logits.device)
    pred = distances_to_boxes(distances.flatten(2), xs, ys)
    used = targets.weight > 0
    weight = targets.weight[used]
    box = ((1 - giou(pred[used], targets.boxes[used])) * weight).sum() / weight.sum().clamp(
        min=1e-6
    )
    heat = focal_loss(heat_logits, targets.heatmap)
    return heat + BOX_LOSS_WEIGHT * box, {"heat": heat.item(), "box": box.item()}
