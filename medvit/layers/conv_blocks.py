"""Convolutional blocks of the U-shaped decoders (UNETR, Swin-UNETR, TransUNet).

They compute what MONAI's `UnetResBlock` / `UnetBasicBlock` and UNETR up-blocks compute,
so MONAI checkpoints load into them by a key mapping (`medvit.convert.monai`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.helpers import batch_norm_nd, conv_nd, conv_transpose_nd

NORMS = ("instance", "batch")


class PointwiseConv(nn.Module):
    """A 1x1(x1) convolution computed as a channel contraction.

    Same parameters (`weight` shaped like a Conv's, optional `bias`) and result as
    `ConvNd(in, out, 1)`, but oneDNN has no fast kernel for 1x1x1 3D convolutions on
    CPUs and falls back to a slow path; the contraction is 2x faster there.

    Args:
        spatial_dims: 1, 2 or 3 (the shape of `weight`).
        in_chans: Input channels.
        out_chans: Output channels.
        bias: Add a bias.
    """

    def __init__(self, spatial_dims: int, in_chans: int, out_chans: int, bias: bool = True) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)(in_chans, out_chans, 1, bias=bias)  # for its default init
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.movedim(1, -1)
        if rows.is_contiguous():  # channels-last: one matmul over (B, *grid, C), layout kept
            return F.linear(rows, self.weight.flatten(1), self.bias).movedim(-1, 1)
        y = torch.einsum("bc...,oc->bo...", x, self.weight.flatten(1))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * (y.ndim - 2)))
        return y


class InstanceNorm(nn.Module):
    """Instance norm without affine parameters (MONAI's UNETR decoder norm).

    Computes what `nn.InstanceNorm3d(channels)` computes, but fast on the channels-last maps
    the decoders run in: torch's instance norm copies them to channels-first and back.
    - fp32 (the exact path): two-pass statistics over the `(B, voxels, C)` view; GroupNorm
      would be faster but its one-pass variance drifts ~1e-3 from MONAI on large means.
    - bf16/fp16: GroupNorm with one group per channel, the same normalisation in one fused
      kernel with fp32 statistics (its drift is far below bf16's own rounding); when training,
      on a channels-first copy, whose backward is the fast one.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            if x.requires_grad and not x.is_contiguous():
                # training: GroupNorm's backward on channels-last maps is ~4x slower on CPUs
                # than on channels-first ones, which outweighs the two copies
                return F.group_norm(x.contiguous(), x.shape[1], eps=self.eps).contiguous(memory_format=_layout(x))
            return F.group_norm(x, x.shape[1], eps=self.eps)
        rows = x.movedim(1, -1)
        if not rows.is_contiguous():
            return F.instance_norm(x, eps=self.eps)
        flat = rows.reshape(x.shape[0], -1, x.shape[1])
        centred = flat - flat.mean(1, keepdim=True)
        var = centred.square().mean(1, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        out = centred * scale if centred.requires_grad else centred.mul_(scale)  # autograd needs centred
        return out.view(rows.shape).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def make_norm(spatial_dims: int, name: str, channels: int) -> nn.Module:
    """`instance` (no affine, as MONAI's UNETR) or `batch`."""
    if name == "instance":
        return InstanceNorm(channels)
    if name == "batch":
        return batch_norm_nd(spatial_dims)(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {name!r}")


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with norm and LeakyReLU, optionally residual.

    Args:
        spatial_dims: 2 or 3.
        in_chans: Input channels.
        out_chans: Output channels.
        kernel_size: Kernel of both convolutions.
        norm: `instance` or `batch`.
        residual: Add a (1x1-projected when the width changes) shortcut before the last
            activation.
        act_layer: Activation (MONAI's blocks use LeakyReLU 0.01).
        stride: Stride of the first convolution (nnU-Net's encoder stages downsample so);
            only without `residual`.

    Raises:
        ValueError: `stride` > 1 with `residual`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 3,
        norm: str = "instance",
        residual: bool = True,
        act_layer: Callable[[], nn.Module] = partial(nn.LeakyReLU, 0.01, inplace=True),
        stride: int = 1,
    ) -> None:
        super().__init__()
        if stride != 1 and residual:
            raise ValueError(f"a residual ConvBlock has no strided shortcut; got stride {stride}")
        conv = conv_nd(spatial_dims)
        pad = kernel_size // 2
        self.conv1 = conv(in_chans, out_chans, kernel_size, stride=stride, padding=pad, bias=False)
        self.norm1 = make_norm(spatial_dims, norm, out_chans)
        self.conv2 = conv(out_chans, out_chans, kernel_size, padding=pad, bias=False)
        self.norm2 = make_norm(spatial_dims, norm, out_chans)
        self.act = act_layer()
        self.residual = residual
        self.shortcut: nn.Module | None = None
        if residual and in_chans != out_chans:
            self.shortcut = nn.Sequential(
                PointwiseConv(spatial_dims, in_chans, out_chans, bias=False), make_norm(spatial_dims, norm, out_chans)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.residual:
            short = self.shortcut(x) if self.shortcut is not None else x
            # in place when nothing records the graph: no second full-size map
            out = out + short if out.requires_grad else out.add_(short)
        return self.act(out)


def upsample_conv(spatial_dims: int, in_chans: int, out_chans: int, scale: int = 2) -> nn.Module:
    """Transposed convolution with kernel = stride = `scale` and no bias."""
    return conv_transpose_nd(spatial_dims)(in_chans, out_chans, scale, stride=scale, bias=False)


class ProjectionUpsample(nn.Module):
    """Upsample a token map `num_up` times by 2 (UNETR's skip path from a transformer layer).

    The first step projects `in_chans` to `out_chans`; each further step is an upsampling
    followed by a conv block (when `conv_block`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        out_chans: int,
        num_up: int,
        norm: str = "instance",
        residual: bool = True,
        conv_block: bool = True,
    ) -> None:
        super().__init__()
        if num_up < 1:
            raise ValueError(f"num_up must be >= 1, got {num_up}")
        self.proj = upsample_conv(spatial_dims, in_chans, out_chans)
        steps: list[nn.Module] = []
        for _ in range(num_up - 1):
            up = upsample_conv(spatial_dims, out_chans, out_chans)
            if conv_block:
                up = nn.Sequential(
                    up, ConvBlock(spatial_dims, out_chans, out_chans, norm=norm, residual=residual)
                )
            steps.append(up)
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for step in self.steps:
            x = step(x)
        return x


class UpBlock(nn.Module):
    """Upsample by 2, concatenate the skip, fuse with a conv block."""

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        out_chans: int,
        norm: str = "instance",
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.up = upsample_conv(spatial_dims, in_chans, out_chans)
        self.fuse = ConvBlock(spatial_dims, 2 * out_chans, out_chans, norm=norm, residual=residual)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))
