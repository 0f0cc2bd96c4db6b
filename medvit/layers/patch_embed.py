"""Patch embedding for 2D images, 3D volumes and videos (time x 2D tubelets).

A video clip `(B, C, T, H, W)` is embedded as a 3D input whose first patch extent is the
tubelet length (ViViT), so one class serves all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import check_spatial_dims, conv_nd, to_ntuple


def grid_for(img_size: Sequence[int], patch_size: Sequence[int], what: str = "image size") -> tuple[int, ...]:
    """Token grid of an input, raising when a patch size does not divide it."""
    bad = [(i, p) for i, p in zip(img_size, patch_size) if p <= 0 or i % p != 0]
    if bad:
        raise ValueError(
            f"patch size {tuple(patch_size)} does not divide the {what} {tuple(img_size)}"
        )
    return tuple(i // p for i, p in zip(img_size, patch_size))


class PatchEmbed(nn.Module):
    """Non-overlapping patches (or tubelets) projected by a strided convolution.

    Args:
        spatial_dims: 2 for images, 3 for volumes and videos.
        img_size: Input spatial size; an int is repeated over `spatial_dims`.
        patch_size: Patch (or tubelet) extent per spatial dimension.
        in_chans: Input channels.
        embed_dim: Token width.
        norm_layer: Optional norm applied to the tokens.
        flatten: Return tokens `(B, N, D)` instead of a channels-first map.
        bias: Bias of the projection.
        strict_img_size: Raise when the input size differs from `img_size`; when False,
            any input whose size the patch divides is accepted.
    """

    def __init__(
        self,
        spatial_dims: int,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten: bool = True,
        bias: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.patch_size = to_ntuple(patch_size, spatial_dims, "patch_size")
        if in_chans < 1 or embed_dim < 1:
            raise ValueError(f"in_chans and embed_dim must be positive, got {in_chans}, {embed_dim}")
        self.grid_size = grid_for(self.img_size, self.patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.proj = conv_nd(spatial_dims)(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def dynamic_grid(self, size: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an input of spatial `size`, validating it."""
        size = tuple(size)
        if self.strict_img_size and size != self.img_size:
            raise ValueError(
                f"input size {size} does not match the model's img_size {self.img_size}"
                " (create the model with this img_size, or dynamic_img_size=True)"
            )
        return grid_for(size, self.patch_size, "input size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D input (batch, channels and "
                f"{self.spatial_dims} spatial dims), got shape {tuple(x.shape)}"
            )
        self.dynamic_grid(x.shape[2:])
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)
