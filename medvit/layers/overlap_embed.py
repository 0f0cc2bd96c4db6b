"""Overlapping patch embedding (PVT v2, SegFormer's overlapped patch merging).

A convolution whose kernel is larger than its stride (7/4 for the stem, 3/2 between
stages), padded by half the kernel, so neighbouring patches share pixels; then LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import check_spatial_dims, conv_nd, to_ntuple


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with overlapping windows, to `(B, N, C)` normalised tokens.

    Args:
        img_size: Spatial size of the input map; an int is repeated over `spatial_dims`.
        patch_size: Kernel extent (larger than `stride`).
        stride: Stride, the downsampling factor.
        in_chans: Input channels.
        embed_dim: Token width.
        spatial_dims: 2 for images, 3 for volumes.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 7,
        stride: int = 4,
        in_chans: int = 3,
        embed_dim: int = 768,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if not patch_size > stride >= 1:
            raise ValueError(f"patch_size {patch_size} must be larger than the stride {stride}")
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        pad = patch_size // 2
        self.grid_size = tuple((s + 2 * pad - patch_size) // stride + 1 for s in self.img_size)
        if min(self.grid_size) < 1:
            raise ValueError(
                f"input size {self.img_size} is too small for a stride-{stride} embedding"
            )
        self.proj = conv_nd(spatial_dims)(
            in_chans, embed_dim, patch_size, stride=stride, padding=pad
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])} does not match {self.img_size}"
            )
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))
