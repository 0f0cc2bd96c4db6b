"""Patch embedding from a CNN feature map (the hybrid architecture of the ViT paper).

Instead of cutting the image into patches, a CNN backbone computes a feature map and its
positions (or patches of it) become the tokens, projected to the token width by a
convolution whose kernel and stride are the patch size measured on the feature map
(1x1 in the ViT paper's hybrids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import conv_nd, to_ntuple
from medvit.layers.patch_embed import PatchEmbed, grid_for


class HybridEmbed(nn.Module):
    """Backbone feature map -> projection -> tokens; a drop-in for `PatchEmbed`.

    `patch_size` is measured in input pixels, as for `PatchEmbed`: it is the backbone's
    stride times the projection's kernel, so `img_size / patch_size` is the token grid and
    a ViT's position table and feature maps mean the same as with plain patches.

    Args:
        backbone: A CNN with `forward_features(x)` returning its last map and the
            attributes `num_features` (its channels), `reduction` (its stride),
            `in_chans` and `spatial_dims`.
        img_size: Input spatial size.
        patch_size: Effective patch extent in input pixels; a multiple of the backbone's
            stride.
        embed_dim: Token width.
        bias: Bias of the projection.
        flatten: Return tokens `(B, N, D)` instead of a channels-first map.
        strict_img_size: Raise when the input size differs from `img_size`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        embed_dim: int = 768,
        bias: bool = True,
        flatten: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = backbone.spatial_dims
        self.in_chans = backbone.in_chans
        self.img_size = to_ntuple(img_size, self.spatial_dims, "img_size")
        self.patch_size = to_ntuple(patch_size, self.spatial_dims, "patch_size")
        self.feature_ratio = to_ntuple(backbone.reduction, self.spatial_dims, "reduction")
        if any(p % r for p, r in zip(self.patch_size, self.feature_ratio)):
            raise ValueError(
                f"patch size {self.patch_size} must be a multiple of the backbone's stride "
                f"{self.feature_ratio}"
            )
        self.grid_size = grid_for(self.img_size, self.patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.backbone = backbone
        kernel = tuple(p // r for p, r in zip(self.patch_size, self.feature_ratio))
        self.proj = conv_nd(self.spatial_dims)(
            backbone.num_features, embed_dim, kernel, stride=kernel, bias=bias
        )

    # the same input validation as the plain patch embedding
    dynamic_grid = PatchEmbed.dynamic_grid

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens (or a map, when not `flatten`) from a backbone feature map computed elsewhere.

        A U-shaped model that also needs the backbone's skip features runs
        `backbone.forward_intermediates` once and projects its final map here.
        """
        x = self.proj(features)
        return x.flatten(2).transpose(1, 2) if self.flatten else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D input (batch, channels and "
                f"{self.spatial_dims} spatial dims), got shape {tuple(x.shape)}"
            )
        self.dynamic_grid(x.shape[2:])
        return self.project(self.backbone.forward_features(x))
