"""ResNet bottleneck block (He et al., "Deep Residual Learning for Image Recognition", 2016).

Post-activation with BatchNorm, stride on the 3x3 convolution (the "v1.5" placement of
torchvision), and a 1x1-conv + BN shortcut when the shape changes. BiT's pre-activation,
weight-standardised bottleneck is a different block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.helpers import batch_norm_nd, conv_nd


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, each with BN, plus the shortcut.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_chans: Input channels.
        planes: Width of the 3x3 convolution; the output has `planes * expansion`.
        stride: Stride of the 3x3 convolution and the shortcut.
        expansion: Output width relative to `planes`.
        act_layer: Activation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        planes: int,
        stride: int = 1,
        expansion: int = 4,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        conv, norm = conv_nd(spatial_dims), batch_norm_nd(spatial_dims)
        out_chans = planes * expansion
        self.conv1 = conv(in_chans, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, out_chans, 1, bias=False)
        self.bn3 = norm(out_chans)
        self.act = act_layer()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chans != out_chans:
            self.downsample = nn.Sequential(
                conv(in_chans, out_chans, 1, stride=stride, bias=False), norm(out_chans)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        return self.act(self.bn3(self.conv3(y)) + shortcut)
