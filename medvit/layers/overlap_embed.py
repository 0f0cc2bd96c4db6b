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

    The padding makes every input side valid (the grid is `ceil(side / stride)`), so the
    embedding runs at any input size; `img_size` and `grid_size` only record the size the
    owning model was built for.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        img_size: Spatial size the model is built for; an int is repeated over `spatial_dims`.
        patch_size: Kernel extent (larger than `stride`).
        stride: Stride, the downsampling factor.
        in_chans: Input channels.
        embed_dim: Token width.
    """

    def __init__(
        self,
        spatial_dims: int,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 7,
        stride: int = 4,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if not patch_size > stride >= 1:
            raise ValueError(f"patch_size {patch_size} must be larger than the stride {stride}")
        self.patch_size = patch_size
        self.stride = stride
        self.in_chans = in_chans
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.grid_size = self.output_size(self.img_size)
        self.proj = conv_nd(spatial_dims)(
            in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2
        )
        self.norm = nn.LayerNorm(embed_dim)

    def output_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Token grid of an input of spatial size `size`.

        Raises:
            ValueError: `size` has the wrong number of dims or a side below 1.
        """
        size = tuple(size)
        if len(size) != self.spatial_dims or min(size) < 1:
            raise ValueError(
                f"input size {size} is not a positive {self.spatial_dims}D size"
                f" for a stride-{self.stride} embedding"
            )
        pad = self.patch_size // 2
        return tuple((s + 2 * pad - self.patch_size) // self.stride + 1 for s in size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Channels-first map in; its tokens `(B, N, C)` and their grid out.

        Raises:
            ValueError: The input is not `(B, in_chans, *spatial)` with `spatial_dims` sides.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (B, {self.in_chans}, {self.spatial_dims} spatial dims),"
                f" got {tuple(x.shape)}"
            )
        y = self.proj(x)
        return self.norm(y.flatten(2).transpose(1, 2)), tuple(y.shape[2:])
