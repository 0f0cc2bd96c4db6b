"""Linear layers paired with BatchNorm, which fold into one affine map at inference.

LeViT (Graham et al., 2021) replaces LayerNorm by BatchNorm next to every linear, so the
normalisation costs nothing once fused. `LinearNorm` is linear then BN over the tokens,
`ConvNorm` the same for a convolution, `NormLinear` BN then linear (a classifier head).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LinearNorm(nn.Module):
    """Bias-free linear followed by BatchNorm over all `(B * N)` tokens.

    Args:
        in_features: Input width.
        out_features: Output width.
        bn_weight_init: Initial BN scale (0 starts a residual branch as identity).
    """

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, -2)).reshape_as(x)


class ConvNorm(nn.Module):
    """Bias-free convolution followed by BatchNorm.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Zero padding.
        bn_weight_init: Initial BN scale.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class NormLinear(nn.Module):
    """BatchNorm, dropout, then linear: a classifier on pooled features.

    Args:
        in_features: Input width.
        out_features: Output width.
        bias: Bias of the linear.
        drop: Dropout between the norm and the linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))
