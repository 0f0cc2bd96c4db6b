"""Multiscale Vision Transformer (MViT v1), for images and 3D grids.

Fan et al., "Multiscale Vision Transformers", ICCV 2021.

A strided conv stem (7x7, stride 4) feeds a class token plus absolute position embedding
into blocks of pooling attention (q/k/v pooled by a depthwise conv + LayerNorm, no relative
positions, no residual pooling). The first block of each later stage pools its queries by 2
(halving the grid) and doubles the heads; the last block of the stage before doubles the
width through its MLP, so stage outputs are 2x the stage's attention width except the last.
Keys/values are pooled to a fixed coarse grid (adaptive stride). Layout and names follow the
reference (PySlowFast) `MViT`; timm has no v1. With `spatial_dims=3` the same code runs on
volumes `(B, C, D, H, W)`; the video model (3D pooling over space-time) builds on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.drop import DropPath, drop_path_schedule
from medvit.layers.helpers import check_spatial_dims, conv_nd, to_ntuple
from medvit.layers.mlp import Mlp
from medvit.layers.pooling_attention_v1 import POOL_MODES, PoolingAttentionV1
from medvit.models.image._mvit_common import (
    MultiScaleBackbone,
    check_input_size,
    check_network_stride,
    pool_tokens,
    shortcut_pool,
)
from medvit.registry import register_model

POOL_TYPES = ("token", "avg", "")


class MultiScaleBlockV1(nn.Module):
    """Pre-norm pooling-attention block; the MLP (and its projected shortcut) widens.

    Args:
        spatial_dims: 2 or 3.
        dim: Input (and attention) width.
        dim_out: Output width; a linear projects the normalised MLP input when it differs.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `dim`.
        qkv_bias: Bias of the q/k/v projection.
        drop_path: Stochastic depth probability.
        kernel_q: Query pooling kernel (empty: no query pooling).
        kernel_kv: Key/value pooling kernel.
        stride_q: Query (and shortcut) pooling stride.
        stride_kv: Key/value pooling stride.
        mode: Pooling kind, `conv`, `max` or `avg`.
        has_cls_token: The first token is a class token, never pooled.
        norm_layer: Norm class.
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        kernel_q: Sequence[int] = (),
        kernel_kv: Sequence[int] = (),
        stride_q: Sequence[int] = (),
        stride_kv: Sequence[int] = (),
        mode: str = "conv",
        has_cls_token: bool = True,
        norm_layer: type[nn.Module] | partial = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.has_cls_token = has_cls_token
        self.norm1 = norm_layer(dim)
        self.attn = PoolingAttentionV1(
            spatial_dims, dim, dim, num_heads=num_heads, qkv_bias=qkv_bias, kernel_q=kernel_q,
            kernel_kv=kernel_kv, stride_q=stride_q, stride_kv=stride_kv, mode=mode,
            has_cls_token=has_cls_token, norm_layer=norm_layer,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim_out)
        self.shortcut_proj_mlp = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.shortcut_pool_attn = shortcut_pool(spatial_dims, stride_q)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        y, new_size = self.attn(self.norm1(x), feat_size)
        x = pool_tokens(self.shortcut_pool_attn, x, feat_size, self.has_cls_token) + self.drop_path(y)
        x_norm = self.norm2(x)
        # as in the reference: the widened shortcut is the normalised MLP input
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path(self.mlp(x_norm)), new_size


class MViT(MultiScaleBackbone):
    """MViT v1 classifier/backbone over 2D images or 3D volumes.

    Args:
        img_size: Input size; it fixes the position table, so inputs must match.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` (class token, the paper's head), `avg` (mean of the patch
            tokens) or `` (forward returns the tokens).
        embed_dim: Width of the first stage; it doubles at every stage.
        depth: Blocks per stage; the paper's B-16 is (1, 2, 11, 2).
        num_heads: Heads of the first stage; doubles at every stage.
        mlp_ratio: MLP hidden width relative to the block's input width.
        qkv_bias: Bias of the q/k/v projections.
        patch_size: Stem conv kernel.
        patch_stride: Stem conv stride.
        patch_padding: Stem conv padding.
        kernel_qkv: Pooling kernel of q/k/v.
        stride_q: Query pooling stride of the first block of every later stage.
        stride_kv_adaptive: Key/value pooling stride of the first stage; later stages divide
            it by their query stride so keys stay on one coarse grid.
        mode: Pooling kind: `conv` (the paper's best), `max` or `avg`.
        class_token: Use a class token.
        spatial_dims: 2 for images, 3 for volumes.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).

    `forward_intermediates` takes a stage's output after its last block, which already has
    the next stage's width (B-16: 192/384/768/768 channels).
    """

    pool_types = POOL_TYPES

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 96,
        depth: Sequence[int] = (1, 2, 11, 2),
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int | Sequence[int] = 7,
        patch_stride: int | Sequence[int] = 4,
        patch_padding: int | Sequence[int] = 3,
        kernel_qkv: int | Sequence[int] = 3,
        stride_q: int | Sequence[int] = 2,
        stride_kv_adaptive: int | Sequence[int] = 4,
        mode: str = "conv",
        class_token: bool = True,
        spatial_dims: int = 2,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        freeze_patch_embed: bool = False,
    ) -> None:
        n = check_spatial_dims(spatial_dims)
        if n == 1:
            raise ValueError("spatial_dims must be 2 or 3, got 1")
        super().__init__(in_chans, num_classes, global_pool, depth, spatial_dims=n, class_token=class_token)
        if mode not in POOL_MODES:
            raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
        self.img_size = to_ntuple(img_size, n, "img_size")
        patch_size = to_ntuple(patch_size, n, "patch_size")
        patch_stride = to_ntuple(patch_stride, n, "patch_stride")
        patch_padding = to_ntuple(patch_padding, n, "patch_padding")
        kernel = to_ntuple(kernel_qkv, n, "kernel_qkv")
        q_stride = to_ntuple(stride_q, n, "stride_q")
        kv_stride = to_ntuple(stride_kv_adaptive, n, "stride_kv_adaptive")
        check_network_stride(self.img_size, [p * q ** (len(depth) - 1) for p, q in zip(patch_stride, q_stride)])
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = conv_nd(n)(in_chans, embed_dim, patch_size, stride=patch_stride,
                                           padding=patch_padding)
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        feat_size = [(s + 2 * p - k) // st + 1
                     for s, p, k, st in zip(self.img_size, patch_padding, patch_size, patch_stride)]
        self.grid_size = tuple(feat_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        num_tokens = math.prod(feat_size) + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stage_starts = [sum(depth[:i]) for i in range(len(depth))]
        self.stage_ends = [sum(depth[: i + 1]) - 1 for i in range(len(depth))]
        self.blocks = nn.ModuleList()
        # strides are reported along the last (in-plane) axis, as decoders of videos expect
        dim, heads, stride = embed_dim, num_heads, patch_stride[-1]
        for i in range(sum(depth)):
            block_q = ()
            if i in stage_starts[1:]:
                block_q = q_stride
                heads *= 2
                stride *= q_stride[-1]
                kv_stride = tuple(max(s // q, 1) for s, q in zip(kv_stride, q_stride))
            dim_out = dim * 2 if i in self.stage_ends[:-1] else dim
            self.blocks.append(
                MultiScaleBlockV1(
                    n, dim, dim_out, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                    kernel_q=kernel if block_q else (), kernel_kv=kernel, stride_q=block_q,
                    stride_kv=kv_stride, mode=mode, has_cls_token=class_token, norm_layer=norm_layer,
                )
            )
            if i in self.stage_ends:
                self.stage_channels.append(dim_out)
                self.stage_strides.append(stride)
            dim = dim_out
        self._build_head(dim, num_classes, drop_rate, norm_layer)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self._init_linear()

    def _check_input(self, x: torch.Tensor) -> None:
        check_input_size(x, self.img_size, "the position table is")

    def _pos_embed(self, feat_size: Sequence[int]) -> torch.Tensor:
        """Position table for the tokens (class token first) of a `feat_size` grid."""
        return self.pos_embed

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        self._check_input(x)
        x = self.patch_embed.proj(x)
        feat_size = list(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self._pos_embed(feat_size)), feat_size

    def _forward_stage(self, i: int, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        start = self.stage_ends[i - 1] + 1 if i else 0
        for blk in self.blocks[start : self.stage_ends[i] + 1]:
            x, feat_size = blk(x, feat_size)
        return x, feat_size


# the paper's ImageNet configurations (PySlowFast MVIT_B_16_CONV / MVIT_B_24_CONV):
# 16 blocks 1-2-11-2, 24 blocks 2-3-16-3, width 96 doubling, conv pooling
@register_model
def mvit_b_16(**kwargs: Any) -> MViT:
    """MViT-B-16: blocks 1/2/11/2, conv pooling (Fan et al., 2021)."""
    return MViT(**{**dict(depth=(1, 2, 11, 2)), **kwargs})


@register_model
def mvit_b_24(**kwargs: Any) -> MViT:
    """MViT-B-24: blocks 2/3/16/3, conv pooling (Fan et al., 2021)."""
    return MViT(**{**dict(depth=(2, 3, 16, 3)), **kwargs})


@register_model
def mvit_b_16_3d(**kwargs: Any) -> MViT:
    """MViT-B-16 on isotropic volumes: 3D stem and pooling, one input channel, 96^3 crops, two classes."""
    cfg = dict(depth=(1, 2, 11, 2), spatial_dims=3, img_size=96, in_chans=1, num_classes=2)
    return MViT(**{**cfg, **kwargs})
