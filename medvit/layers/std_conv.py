"""Weight-standardised convolution and TensorFlow "SAME" padding.

Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", 2019) normalises each filter to zero mean and
unit variance before the convolution; with GroupNorm it replaces BatchNorm in the BiT and
ViT-hybrid ResNets. Those networks were trained in JAX/TensorFlow, whose "SAME" padding
pads asymmetrically (more at the end) when the stride is above 1, so their weights only
reproduce their features with the same padding: `padding="same"` here computes it per
input size as TensorFlow does.
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
    dilation: Sequence[int] = (1, 1),
    value: float = 0.0,
) -> torch.Tensor:
    """Pad the last two axes of `x` as TensorFlow's "SAME" (the odd pixel goes at the end)."""
    pad_h = same_padding(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    pad_w = same_padding(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class StdConv2d(nn.Conv2d):
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
        k = to_ntuple(kernel_size, 2, "kernel_size")
        s = to_ntuple(stride, 2, "stride")
        d = to_ntuple(dilation, 2, "dilation")
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
        return F.conv2d(
            x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class MaxPool2dSame(nn.Module):
    """Max pooling with TensorFlow "SAME" padding (padded with -inf, so padding never wins).

    Args:
        kernel_size: Window extent.
        stride: Stride (defaults to the kernel size).
    """

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.kernel_size = to_ntuple(kernel_size, 2, "kernel_size")
        self.stride = to_ntuple(stride if stride is not None else kernel_size, 2, "stride")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
