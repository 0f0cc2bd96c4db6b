"""Token pooling between transformer stages: depthwise strided convolution on the grid.

Heo et al. (PiT) halve the token grid and widen the channels between stages; the class
(and other prefix) tokens, which have no position on the grid, go through a linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ConvTokenPool(nn.Module):
    """Depthwise strided conv for the patch-token map, a linear for the prefix tokens.

    Args:
        in_features: Input channels.
        out_features: Output channels (a multiple of `in_features`: the conv is depthwise).
        stride: Spatial reduction; the kernel is `stride + 1` with `stride // 2` padding.
    """

    def __init__(self, in_features: int, out_features: int, stride: int = 2) -> None:
        super().__init__()
        if out_features % in_features != 0:
            raise ValueError(
                f"out_features ({out_features}) must be a multiple of in_features ({in_features})"
            )
        self.conv = nn.Conv2d(
            in_features,
            out_features,
            kernel_size=stride + 1,
            padding=stride // 2,
            stride=stride,
            groups=in_features,
        )
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a `(B, C, H, W)` map and map its `(B, P, C)` prefix tokens."""
        return self.conv(x), self.fc(prefix)
