"""Multiscale Vision Transformer (MViT v1) for video: pooling attention over space-time.

Fan et al., "Multiscale Vision Transformers", ICCV 2021.

The image/volume MViT v1 (`medvit.models.image.mvit`) run on `(T, H, W)` token grids with a
space-time cube stem (3x7x7, stride 2x4x4), queries pooled only in space (1x2x2) and
keys/values pooled to a fixed coarse grid (adaptive stride 1x8x8). The one difference is the
position embedding: separate spatial (H*W) and temporal (T) tables plus one for the class
token, summed over the grid, as in PySlowFast and torchvision's `mvit_v1_b`. Input
`(B, C, T, H, W)`. Variant names give frames x sampling rate (16x4: 16 frames taken every
4th frame); the sampling rate belongs to the data pipeline, not the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.helpers import to_ntuple
from medvit.models.image.mvit import MViT
from medvit.registry import register_model


class MViTVideo(MViT):
    """MViT v1 over clips, with separable space/time position embeddings.

    Args:
        img_size: Frame size `(H, W)`.
        num_frames: Frames per clip.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        patch_size: Stem kernel `(t, h, w)`.
        patch_stride: Stem stride `(t, h, w)`.
        patch_padding: Stem padding `(t, h, w)`.
        stride_q: Query pooling stride of the first block of every later stage.
        stride_kv_adaptive: Key/value pooling stride of the first stage.
        **kwargs: The other arguments of `MViT` (`embed_dim`, `depth`, `num_heads`, ...).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        num_frames: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        patch_size: Sequence[int] = (3, 7, 7),
        patch_stride: Sequence[int] = (2, 4, 4),
        patch_padding: Sequence[int] = (1, 3, 3),
        stride_q: Sequence[int] = (1, 2, 2),
        stride_kv_adaptive: Sequence[int] = (1, 8, 8),
        **kwargs: Any,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if "spatial_dims" in kwargs:
            raise ValueError("MViTVideo is always space-time; spatial_dims cannot be set")
        hw = to_ntuple(img_size, 2, "img_size")
        super().__init__(
            img_size=(num_frames, *hw), in_chans=in_chans, num_classes=num_classes,
            patch_size=patch_size, patch_stride=patch_stride, patch_padding=patch_padding,
            stride_q=stride_q, stride_kv_adaptive=stride_kv_adaptive, spatial_dims=3, **kwargs,
        )
        self.clip_size = (num_frames, *hw)
        self.img_size = hw
        self.num_frames = num_frames
        self.spatial_dims = 2
        dim = self.pos_embed.shape[-1]
        del self.pos_embed
        t, h, w = self.grid_size
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, dim))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim)) if self.cls_token is not None else None
        for p in (self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[2:]) != self.clip_size:
            raise ValueError(
                f"input clip size {tuple(x.shape[2:])} differs from (num_frames, *img_size) "
                f"{self.clip_size}, which the position tables are built for"
            )

    def _pos_embed(self, feat_size: Sequence[int]) -> torch.Tensor:
        t, hw = feat_size[0], feat_size[1] * feat_size[2]
        # tokens are time-major: frame i's H*W tokens are contiguous
        pos = self.pos_embed_spatial.repeat(1, t, 1) + self.pos_embed_temporal.repeat_interleave(hw, dim=1)
        return pos if self.pos_embed_class is None else torch.cat((self.pos_embed_class, pos), dim=1)


# the paper's Kinetics MViT-B (PySlowFast MVIT_B_16x4_CONV / MVIT_B_32x3_CONV): 16 blocks
# 1-2-11-2, width 96 doubling, conv pooling; torchvision's mvit_v1_b is the 16x4 model
@register_model
def mvit_base_16x4(**kwargs: Any) -> MViTVideo:
    """MViT-B 16x4: 16 frames, 16 blocks (1-2-11-2), width 96, Kinetics-400 (Fan et al., 2021)."""
    return MViTVideo(**{**dict(num_frames=16, depth=(1, 2, 11, 2)), **kwargs})


@register_model
def mvit_base_32x3(**kwargs: Any) -> MViTVideo:
    """MViT-B 32x3: 32 frames, 16 blocks (1-2-11-2), width 96, Kinetics-400 (Fan et al., 2021)."""
    return MViTVideo(**{**dict(num_frames=32, depth=(1, 2, 11, 2)), **kwargs})
