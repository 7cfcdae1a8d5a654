"""Turning head outputs into boxes: shared by the loss, evaluation and the exported ONNX graph.

The heads predict, at every cell of a stride-`s` grid, one heatmap logit per class and the
distances (left, top, right, bottom, in input pixels) from the cell centre to the box edges.
A detection is a local maximum of the class heatmap (3x3 max-pool "NMS"); the `k` best ones over
all classes and cells are returned sorted by score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DETECTION_FIELDS = ("x1", "y1", "x2", "y2", "score", "class_id")


def cell_centres(
    height: int, width: int, stride: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (x, y) of the centre of every grid cell, each flattened to [H*W]."""
    ys = torch.arange(height, dtype=torch.float32, device=device) * stride + stride / 2
    xs = torch.arange(width, dtype=torch.float32, device=device) * stride + stride / 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return grid_x.reshape(-1), grid_y.reshape(-1)


def distances_to_boxes(
    distances: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor
) -> torch.Tensor:
    """[..., 4, P] (l, t, r, b) around P centres -> [..., P, 4] boxes (x1, y1, x2, y2)."""
    left, top, right, bottom = distances.unbind(-2)
    return torch.stack(
        (centre_x - left, centre_y - top, centre_x + right, centre_y + bottom), dim=-1
    )


def decode(heat_logits: torch.Tensor, distances: torch.Tensor, stride: int, k: int) -> torch.Tensor:
    """Heads [N,C,H,W] logits and [N,4,H,W] distances -> detections [N,k,6] sorted by score.

    Each detection is (x1, y1, x2, y2, score, class_id) with the box clipped to the input image
    and class_id stored as a float.
    """
    _, _, height, width = heat_logits.shape
    cells = height * width
    heat = torch.sigmoid(heat_logits)
    peaks = F.max_pool2d(heat, kernel_size=3, stride=1, padding=1)
    heat = torch.where(peaks == heat, heat, torch.zeros_like(heat))
    scores, index = heat.flatten(1).topk(k, dim=1)
    class_id = torch.div(index, cells, rounding_mode="floor")
    cell = index - class_id * cells
    picked = distances.flatten(2).gather(2, cell.unsqueeze(1).expand(-1, 4, -1))
    centre_x, centre_y = cell_centres(height, width, stride, heat_logits.device)
    x1, y1, x2, y2 = distances_to_boxes(picked, centre_x[cell], centre_y[cell]).unbind(-1)
    right, bottom = float(width * stride), float(height * stride)
    boxes = torch.stack(
        (x1.clamp(0, right), y1.clamp(0, bottom), x2.clamp(0, right), y2.clamp(0, bottom)), -1
    )
    return torch.cat((boxes, scores.unsqueeze(-1), class_id.unsqueeze(-1).to(torch.float32)), -1)
