"""Multiscale Vision Transformer v2.

Li et al., "MViTv2: Improved Multiscale Vision Transformers for Classification and
Detection", CVPR 2022.

A conv patch embedding (stride 4) feeds four stages of pooling-attention blocks; the first
block of each later stage pools its queries by 2 (halving the grid) and widens the tokens,
keys/values are pooled to a fixed coarse grid. Parameter names follow timm's
`MultiScaleVit` (default, no class token, `expand_attn` configuration).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.conv_projection import ConvEmbed
from medvit.layers.drop import DropPath, drop_path_schedule
from medvit.layers.helpers import to_ntuple
from medvit.layers.mlp import Mlp
from medvit.layers.pooling_attention import PoolingAttention
from medvit.models.image._mvit_common import (
    MultiScaleBackbone,
    check_input_size,
    check_network_stride,
    pool_tokens,
    shortcut_pool,
)
from medvit.registry import register_model

POOL_TYPES = ("avg", "")


class MultiScaleBlock(nn.Module):
    """Pre-norm pooling-attention block whose shortcut is pooled (and projected) to match.

    Args:
        dim: Input width.
        dim_out: Output width (a linear projects the shortcut when it differs).
        num_heads: Attention heads.
        feat_size: Input token grid.
        mlp_ratio: MLP hidden width relative to `dim_out`.
        qkv_bias: Bias of the q/k/v projection.
        drop_path: Stochastic depth probability.
        stride_q: Query (and shortcut) pooling stride.
        stride_kv: Key/value pooling stride.
        kernel_qkv: Pooling kernel.
        residual_pooling: Add the pooled query to the attention output.
        norm_layer: Norm class.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        feat_size: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        stride_q: Sequence[int] = (1, 1),
        stride_kv: Sequence[int] = (1, 1),
        kernel_qkv: Sequence[int] = (3, 3),
        residual_pooling: bool = True,
        norm_layer: type[nn.Module] | partial = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.shortcut_proj_attn = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.shortcut_pool_attn = shortcut_pool(2, stride_q)
        self.attn = PoolingAttention(
            dim, dim_out, feat_size, num_heads=num_heads, qkv_bias=qkv_bias, kernel_q=kernel_qkv,
            kernel_kv=kernel_qkv, stride_q=stride_q, stride_kv=stride_kv,
            residual_pooling=residual_pooling, norm_layer=norm_layer,
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        x_norm = self.norm1(x)
        # as in the reference: the shortcut is the un-normalised input unless it is projected
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        shortcut = pool_tokens(self.shortcut_pool_attn, shortcut, feat_size)
        y, feat_size = self.attn(x_norm, feat_size)
        x = shortcut + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, feat_size


class MultiScaleVitStage(nn.Module):
    """Blocks at one scale; the first one downsamples and widens."""

    def __init__(self, dim: int, dim_out: int, depth: int, feat_size: Sequence[int],
                 stride_q: Sequence[int], drop_path: Sequence[float], **block_args: object) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(
                MultiScaleBlock(
                    dim if i == 0 else dim_out, dim_out, feat_size=feat_size,
                    stride_q=stride_q if i == 0 else (1, 1), drop_path=drop_path[i], **block_args,
                )
            )
            if i == 0:
                feat_size = [s // st for s, st in zip(feat_size, stride_q)]
        self.feat_size = list(feat_size)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        for blk in self.blocks:
            x, feat_size = blk(x, feat_size)
        return x, feat_size


class MultiScaleVit(MultiScaleBackbone):
    """MViTv2 classifier/backbone (2D).

    Args:
        img_size: Input size; it fixes the relative position tables, so inputs must match.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` (mean of tokens) or `` (forward returns the tokens).
        embed_dim: Width of the first stage; it doubles at every stage.
        depth: Blocks per stage.
        num_heads: Heads of the first stage; doubles at every stage.
        mlp_ratio: MLP hidden width relative to the block width.
        qkv_bias: Bias of the q/k/v projections.
        kernel_qkv: Pooling kernel of q/k/v.
        stride_kv_adaptive: Key/value pooling stride of the first stage; later stages
            divide it by their query stride so keys stay on one coarse grid.
        residual_pooling: Residual pooling connection (MViTv2's addition).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
    """

    pool_types = POOL_TYPES

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depth: Sequence[int] = (1, 2, 5, 2),
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_qkv: int = 3,
        stride_kv_adaptive: int = 4,
        residual_pooling: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__(in_chans, num_classes, global_pool, depth, spatial_dims=2)
        self.img_size = to_ntuple(img_size, 2, "img_size")
        check_network_stride(self.img_size, 4 * 2 ** (len(depth) - 1))
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = ConvEmbed(2, in_chans, embed_dim, patch_size=7, stride=4, padding=3, norm_layer=None)
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        feat_size = [s // 4 for s in self.img_size]
        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stride_kv = stride_kv_adaptive
        dim = embed_dim
        self.stages = nn.ModuleList()
        stride = 4
        for i, d in enumerate(depth):
            stride_q = 1 if i == 0 else 2
            stride_kv = max(stride_kv // stride_q, 1)
            dim_out = embed_dim * 2**i
            stage = MultiScaleVitStage(
                dim, dim_out, d, feat_size, stride_q=(stride_q,) * 2,
                drop_path=dpr[sum(depth[:i]) : sum(depth[: i + 1])], num_heads=num_heads * 2**i,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, stride_kv=(stride_kv,) * 2,
                kernel_qkv=(kernel_qkv,) * 2, residual_pooling=residual_pooling, norm_layer=norm_layer,
            )
            self.stages.append(stage)
            feat_size = stage.feat_size
            stride *= stride_q
            dim = dim_out
            self.stage_channels.append(dim_out)
            self.stage_strides.append(stride)
        self._build_head(dim, num_classes, drop_rate, norm_layer)
        self._init_linear()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        check_input_size(x, self.img_size, "the relative position tables are")
        return self.patch_embed(x)

    def _forward_stage(self, i: int, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        return self.stages[i](x, feat_size)


# Table 1 of the paper (T: 1-2-5-2, S: 1-2-11-2, B: 2-3-16-3), as timm's configurations.
@register_model
def mvitv2_tiny(**kwargs: Any) -> MultiScaleVit:
    """MViTv2-T: blocks 1/2/5/2 (Li et al., 2022)."""
    return MultiScaleVit(**{**dict(depth=(1, 2, 5, 2)), **kwargs})


@register_model
def mvitv2_small(**kwargs: Any) -> MultiScaleVit:
    """MViTv2-S: blocks 1/2/11/2 (Li et al., 2022)."""
    return MultiScaleVit(**{**dict(depth=(1, 2, 11, 2)), **kwargs})


@register_model
def mvitv2_base(**kwargs: Any) -> MultiScaleVit:
    """MViTv2-B: blocks 2/3/16/3 (Li et al., 2022)."""
    return MultiScaleVit(**{**dict(depth=(2, 3, 16, 3)), **kwargs})
