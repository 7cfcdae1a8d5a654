"""A small single-stage anchor-free detector (CenterNet / TTFNet style) in plain PyTorch.

Backbone: a 4x4 stride-4 patch stem and conv-bn-relu stages down to stride 32. A top-down path
(nearest upsampling + 1x1 laterals) merges them back to the output stride (8 by default, or 4),
where two heads predict a heatmap logit per class and the distances from each cell centre to the
four box edges.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.detector.decode import decode

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
    """Images [N,3,H,W] RGB in 0..1 -> heatmap logits [N,C,H/s,W/s] and distances [N,4,H/s,W/s]."""

    def __init__(
        self,
        num_classes: int,
        stride: int = 8,
        widths: tuple[int, int, int, int] = (32, 64, 96, 128),
        neck: int = 64,
        head: int = 48,
    ) -> None:
        super().__init__()
        c4, c8, c16, c32 = widths
        self.num_classes = num_classes
        self.stride = stride
        self.out_level = {4: 0, 8: 1}[stride]
        self.stages = nn.ModuleList(
            [
                nn.Sequential(conv_bn_relu(3, c4, 4, 4), conv_bn_relu(c4, c4)),
                nn.Sequential(conv_bn_relu(c4, c8, 2), conv_bn_relu(c8, c8)),
                nn.Sequential(conv_bn_relu(c8, c16, 2), conv_bn_relu(c16, c16)),
                nn.Sequential(conv_bn_relu(c16, c32, 2), conv_bn_relu(c32, c32)),
            ]
        )
        levels = range(self.out_level, 4)
        self.laterals = nn.ModuleList([nn.Conv2d(widths[i], neck, 1) for i in levels])
        self.smooth = nn.ModuleList(
            [conv_bn_relu(neck, head if i == self.out_level else neck) for i in levels[:-1]]
        )
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.heat_head = nn.Sequential(conv_bn_relu(head, head), nn.Conv2d(head, num_classes, 1))
        self.box_head = nn.Sequential(conv_bn_relu(head, head), nn.Conv2d(head, 4, 1))
        nn.init.constant_(self.heat_head[-1].bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.box_head[-1].bias, math.log(16 / stride))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs: heatmap logits and box-edge distances in input pixels."""
        features = []
        x = images
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        features = features[self.out_level :]
        top = self.laterals[-1](features[-1])
        for i in reversed(range(len(features) - 1)):
            top = self.smooth[i](self.laterals[i](features[i]) + self.upsample(top))
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
