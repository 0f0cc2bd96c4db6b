"""Squeeze-and-excitation channel gating (Hu et al., "Squeeze-and-Excitation Networks", 2018)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.helpers import conv_nd


class SqueezeExcite(nn.Module):
    """Global average pool, bottleneck of two 1x1 convolutions, gate the channels.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        channels: Channels of the gated map.
        rd_channels: Bottleneck width.
        act_layer: Bottleneck activation.
        gate_layer: Gate (sigmoid; MobileNetV3 and LocalViT use the hard sigmoid).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        rd_channels: int,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        gate_layer: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        if rd_channels < 1:
            raise ValueError(f"the squeeze-excite width must be >= 1, got {rd_channels}")
        conv = conv_nd(spatial_dims)
        self.fc1 = conv(channels, rd_channels, 1)
        self.act = act_layer()
        self.fc2 = conv(rd_channels, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))
