"""ResNet bottleneck whose middle layer is pluggable, for self-attention hybrids.

The bottleneck of He et al., "Deep Residual Learning for Image Recognition", 2016, with
its 3x3 convolution produced by a factory (plus optional squeeze-excite and stochastic
depth, as the hybrids' training recipes use them), so self-attention hybrids (BoTNet's global MHSA,
HaloNet's blocked local attention) swap only that layer. The network built
from it is `medvit.models.image.botnet.AttnResNet`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.drop import DropPath
from medvit.layers.squeeze_excite import SqueezeExcite

# (in_chs, out_chs, stride, feat_size of the input map) -> the bottleneck's middle layer
MidLayer = Callable[[int, int, int, tuple[int, int]], nn.Module]


def conv3x3_mid(in_chs: int, out_chs: int, stride: int, feat_size: tuple[int, int]) -> nn.Module:
    """The plain ResNet middle layer."""
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)


class ResNetBlock(nn.Module):
    """1x1 reduce -> middle layer (strided) -> [SE] -> 1x1 expand, BN after each, plus the shortcut.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        mid_chs: Bottleneck width (input of the middle layer).
        stride: Stride of the middle layer and the projection shortcut.
        feat_size: Input map size (attention layers with position tables need it).
        mid_layer: Factory of the middle layer.
        value_chs: Output width of the middle layer (HaloNet's value multiplier); `mid_chs` if None.
        act_layer: Activation.
        se_ratio: Squeeze-excite width relative to the middle width; 0 disables it.
        drop_path: Stochastic-depth probability of the residual branch.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        stride: int,
        feat_size: tuple[int, int],
        mid_layer: MidLayer = conv3x3_mid,
        value_chs: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        se_ratio: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        value_chs = value_chs or mid_chs
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = mid_layer(mid_chs, value_chs, stride, feat_size)
        self.bn2 = nn.BatchNorm2d(value_chs)
        self.se = SqueezeExcite(2, value_chs, max(1, round(value_chs * se_ratio)), act_layer) if se_ratio else None
        self.conv3 = nn.Conv2d(value_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act = act_layer()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.bn3(self.conv3(y))
        return self.act(self.drop_path(y) + shortcut)
