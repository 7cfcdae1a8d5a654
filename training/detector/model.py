"""A small single-stage anchor-free detector (CenterNet / TTFNet style) in plain PyTorch.

Backbone: a 4x4 stride-4 patch stem and conv-bn-relu stages down to stride 32. A top-down path
(nearest upsampling + 1x1 laterals) merges them back to stride 4, where two heads predict a
heatmap logit per class and the distances from each cell centre to the four box edges.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.detector.decode import decode

STRIDE = 4
MAX_LOG_DISTANCE = 5.0  # distances are stride * exp(raw), raw clamped for numerical safety


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """Convolution without bias, batch norm, ReLU."""
    padding = (kernel - 1) // 2 if kernel % 2 else 0
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CenterNet(nn.Module):
    """Images [N,3,H,W] RGB in 0..1 -> heatmap logits [N,C,H/4,W/4] and distances [N,4,H/4,W/4]."""

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int, int] = (32, 64, 96, 128),
        neck: int = 64,
        head: int = 48,
    ) -> None:
        super().__init__()
        c4, c8, c16, c32 = widths
        self.num_classes = num_classes
        self.stride = STRIDE
        self.stages = nn.ModuleList(
            [
                nn.Sequential(conv_bn_relu(3, c4, STRIDE, STRIDE), conv_bn_relu(c4, c4)),
                nn.Sequential(conv_bn_relu(c4, c8, 2), conv_bn_relu(c8, c8)),
                nn.Sequential(conv_bn_relu(c8, c16, 2), conv_bn_relu(c16, c16)),
                nn.Sequential(conv_bn_relu(c16, c32, 2), conv_bn_relu(c32, c32)),
            ]
        )
        self.laterals = nn.ModuleList([nn.Conv2d(c, neck, 1) for c in (c4, c8, c16, c32)])
        self.smooth = nn.ModuleList([conv_bn_relu(neck, neck) for _ in range(2)])
        self.smooth.append(conv_bn_relu(neck, head))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.heat_head = nn.Sequential(conv_bn_relu(head, head), nn.Conv2d(head, num_classes, 1))
        self.box_head = nn.Sequential(conv_bn_relu(head, head), nn.Conv2d(head, 4, 1))
        nn.init.constant_(self.heat_head[-1].bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.box_head[-1].bias, math.log(16 / STRIDE))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs: heatmap logits and box-edge distances in input pixels."""
        features = []
        x = images
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        top = self.laterals[3](features[3])
        for level in (2, 1, 0):
            top = self.smooth[2 - level](self.laterals[level](features[level]) + self.upsample(top))
        raw = self.box_head(top).clamp(max=MAX_LOG_DISTANCE)
        return self.heat_head(top), torch.exp(raw) * self.stride


class Detector(nn.Module):
    """The exported graph: images [N,3,H,W] -> detections [N,k,6] (see `decode.decode`)."""

    def __init__(self, net: CenterNet, k: int = 100) -> None:
        super().__init__()
        self.net = net
        self.k = k

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded, score-sorted detections in input pixel coordinates."""
        heat_logits, distances = self.net(images)
        return decode(heat_logits, distances, self.net.stride, self.k)
