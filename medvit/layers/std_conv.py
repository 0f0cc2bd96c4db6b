"""Weight-standardised convolution and TensorFlow "SAME" padding.

Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", 2019) normalises each filter to zero mean and
unit variance before the convolution; with GroupNorm it replaces BatchNorm in the BiT and
ViT-hybrid ResNets. Those networks were trained in JAX/TensorFlow, whose "SAME" padding
pads asymmetrically (more at the end) when the stride is above 1, so their weights only
reproduce their features with the same padding: `padding="same"` here computes it per
input size as TensorFlow does. Both come in 2D and 3D (`StdConv3d`, `MaxPoolSame(3, ...)`)
for volumetric hybrids (3D TransUNet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.helpers import to_ntuple


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Total TensorFlow "SAME" padding of one axis: the output has ceil(size / stride) steps."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


def is_static_same(kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether "SAME" padding is symmetric and independent of the input size."""
    return all(s == 1 and (d * (k - 1)) % 2 == 0 for k, s, d in zip(kernel_size, stride, dilation))


def pad_same(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] | None = None,
    value: float = 0.0,
) -> torch.Tensor:
    """Pad the last `len(kernel_size)` axes of `x` as TensorFlow's "SAME" (the odd pixel goes at the end)."""
    n = len(kernel_size)
    dilation = dilation if dilation is not None else (1,) * n
    pads = [same_padding(x.shape[-n + i], kernel_size[i], stride[i], dilation[i]) for i in range(n)]
    if not any(pads):
        return x
    # F.pad lists the last axis first
    flat = [q for p in reversed(pads) for q in (p // 2, p - p // 2)]
    return F.pad(x, flat, value=value)


class _StdConvNd:
    """Weight standardisation and "SAME" padding on top of `nn.Conv2d` / `nn.Conv3d` (mixin)."""

    spatial_dims: int

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | None = None,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        n = self.spatial_dims
        k = to_ntuple(kernel_size, n, "kernel_size")
        s = to_ntuple(stride, n, "stride")
        d = to_ntuple(dilation, n, "dilation")
        if isinstance(padding, str):
            if padding != "same":
                raise ValueError(f"padding must be an int, None or 'same', got {padding!r}")
            dynamic = not is_static_same(k, s, d)
            pad: int | tuple[int, ...] = 0 if dynamic else tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
        else:
            dynamic = False
            half = tuple(((si - 1) + di * (ki - 1)) // 2 for ki, si, di in zip(k, s, d))
            pad = half if padding is None else padding
        super().__init__(in_chans, out_chans, k, stride=s, padding=pad, dilation=d, groups=groups, bias=bias)
        self.dynamic_same = dynamic
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        # batch_norm over a (1, out, fan_in) view is the fused per-filter standardisation
        w = self.weight.reshape(1, self.out_channels, -1)
        return F.batch_norm(w, None, None, training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class StdConv2d(_StdConvNd, nn.Conv2d):
    """Conv2d whose filters are standardised (zero mean, unit variance over fan-in) on the fly.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        kernel_size: Kernel extent.
        stride: Stride.
        padding: An int (symmetric), None (symmetric, "half the kernel") or `same`
            (TensorFlow's, asymmetric where the stride needs it).
        dilation: Dilation.
        groups: Groups.
        bias: Add a bias (the standardised ResNets have none).
        eps: Added to the filter variance; BiT and the ViT hybrids use 1e-8.
    """

    spatial_dims = 2


class StdConv3d(_StdConvNd, nn.Conv3d):
    """The 3D `StdConv2d` (same arguments), for volumetric hybrids."""

    spatial_dims = 3


def std_conv_nd(spatial_dims: int) -> type[nn.Module]:
    """`StdConv2d` or `StdConv3d`."""
    if spatial_dims not in (2, 3):
        raise ValueError(
            f"weight-standardised convolutions exist in 2D and 3D, got spatial_dims={spatial_dims}"
        )
    return StdConv2d if spatial_dims == 2 else StdConv3d


class MaxPoolSame(nn.Module):
    """Max pooling with TensorFlow "SAME" padding (padded with -inf, so padding never wins).

    Args:
        spatial_dims: 2 or 3.
        kernel_size: Window extent.
        stride: Stride (defaults to the kernel size).
    """

    def __init__(
        self,
        spatial_dims: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.kernel_size = to_ntuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = to_ntuple(stride if stride is not None else kernel_size, spatial_dims, "stride")
        self.pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=-float("inf"))
        return self.pool(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MaxPool2dSame(MaxPoolSame):
    """The 2D `MaxPoolSame` (timm's name, which the 2D hybrids were written with)."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None) -> None:
        super().__init__(2, kernel_size, stride)
