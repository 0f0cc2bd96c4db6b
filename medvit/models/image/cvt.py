"""Convolutional vision Transformer (CvT), for 2D images and (`spatial_dims=3`) volumes.

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021.

Three stages, each opened by a convolutional token embedding (overlapping strided conv +
LayerNorm) and made of blocks whose attention projects q/k/v by depthwise conv + BatchNorm
(stride 2 for keys/values). There is no position embedding; a class token joins in the
last stage only. Parameter names follow the official implementation's, per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.conv_projection import ConvEmbed, ConvProjAttention
from medvit.layers.drop import DropPath, drop_path_schedule
from medvit.layers.helpers import check_spatial_dims, to_ntuple
from medvit.layers.mlp import Mlp
from medvit.models._features import TokenPoolHead, check_output_fmt, feature_take_indices
from medvit.registry import register_model

POOL_TYPES = ("token", "avg", "")


class CvtBlock(nn.Module):
    """Pre-norm block around `ConvProjAttention` (which needs the token grid, so the
    generic `Block` cannot host it)."""

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        num_prefix_tokens: int = 0,
        norm_layer: type[nn.Module] | partial = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ConvProjAttention(
            spatial_dims, dim, dim, num_heads, qkv_bias=qkv_bias, num_prefix_tokens=num_prefix_tokens
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvtStage(nn.Module):
    """Conv token embedding, optional class token, blocks; maps in, map (+ token) out."""

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        stride: int,
        padding: int,
        class_token: bool,
        drop_path: Sequence[float],
        **block_args: object,
    ) -> None:
        super().__init__()
        norm_layer = block_args["norm_layer"]
        self.patch_embed = ConvEmbed(spatial_dims, in_chans, embed_dim, patch_size, stride, padding, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if class_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.num_prefix_tokens = int(class_token)
        self.blocks = nn.ModuleList(
            CvtBlock(
                spatial_dims, embed_dim, num_heads, drop_path=dp, num_prefix_tokens=self.num_prefix_tokens, **block_args
            )
            for dp in drop_path
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, grid)
        cls, x = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return x, (cls if self.cls_token is not None else None)


class ConvolutionalVisionTransformer(TokenPoolHead, nn.Module):
    """CvT classifier/backbone.

    Args:
        img_size: Input spatial size (an int is repeated over `spatial_dims`).
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` (last stage's class token), `avg` (mean of its patch tokens)
            or `` (forward returns the final tokens).
        embed_dim: Width per stage.
        depth: Blocks per stage.
        num_heads: Heads per stage.
        patch_size: Token-embedding conv kernel per stage.
        patch_stride: Token-embedding conv stride per stage.
        patch_padding: Token-embedding conv padding per stage.
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Bias of the q/k/v projections.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block (linear schedule over all blocks).
        norm_eps: LayerNorm epsilon.
        spatial_dims: 2 for images, 3 for volumes.
        freeze_patch_embed: Keep the first token-embedding conv fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: Sequence[int] = (64, 192, 384),
        depth: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_size: Sequence[int] = (7, 3, 3),
        patch_stride: Sequence[int] = (4, 2, 2),
        patch_padding: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        spatial_dims: int = 2,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        n = len(depth)
        if not n or any(len(v) != n for v in (embed_dim, num_heads, patch_size, patch_stride, patch_padding)):
            raise ValueError("embed_dim, depth, num_heads, patch_size/stride/padding need one entry per stage")
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        total_stride = 1
        for s in patch_stride:
            total_stride *= s
        if any(s % total_stride for s in self.img_size):
            raise ValueError(f"the network stride {total_stride} does not divide img_size {self.img_size}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.spatial_dims = spatial_dims
        self.num_prefix_tokens = 1

        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        self.stages = nn.ModuleList()
        self.stage_channels = list(embed_dim)
        self.stage_strides: list[int] = []
        stride, chans = 1, in_chans
        for i in range(n):
            self.stages.append(
                CvtStage(
                    spatial_dims, chans, embed_dim[i], depth[i], num_heads[i], patch_size[i], patch_stride[i],
                    patch_padding[i], class_token=i == n - 1,
                    drop_path=dpr[sum(depth[:i]) : sum(depth[: i + 1])], mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, norm_layer=norm_layer,
                )
            )
            chans = embed_dim[i]
            stride *= patch_stride[i]
            self.stage_strides.append(stride)
        if freeze_patch_embed:
            self.stages[0].patch_embed.requires_grad_(False)
        self.num_features = chans
        self.norm = norm_layer(chans)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(chans, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _run(
        self, x: torch.Tensor, last: int | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}-D input, got shape {tuple(x.shape)}")
        maps, cls = [], None
        for stage in self.stages[: None if last is None else last + 1]:
            x, cls = stage(x)
            maps.append(x)
        return maps, cls

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class token and patch tokens of the last stage after the final norm, `(B, 1 + N, D)`."""
        maps, cls = self._run(x)
        return self.norm(torch.cat([cls, maps[-1].flatten(2).transpose(1, 2)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage maps (strides `stage_strides`, widths `stage_channels`), class token removed.

        Args:
            x: Input `(B, C, *spatial)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Apply the final norm to the last stage's output (the only stage at its width).
            output_fmt: `NCHW` (channels-first maps, any number of dims) or `NLC` tokens.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The intermediates, or `(final_tokens, intermediates)` as `forward_features`.
        """
        check_output_fmt(output_fmt)
        take = feature_take_indices(len(self.stages), indices)
        last_stage = len(self.stages) - 1
        maps, cls = self._run(x, max(take) if (stop_early and intermediates_only) else None)
        feats = []
        for i in take:
            y = maps[i]
            if output_fmt == "NLC" or (norm and i == last_stage):
                y = y.flatten(2).transpose(1, 2)
                if norm and i == last_stage:
                    y = self.norm(y)
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(maps[i].shape)
            feats.append(y)
        if intermediates_only:
            return feats
        return self.norm(torch.cat([cls, maps[-1].flatten(2).transpose(1, 2)], dim=1)), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


# Table 2 of the paper.


@register_model
def cvt_13(**kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-13: widths (64, 192, 384), depths (1, 2, 10), 224 px (Wu et al., 2021)."""
    cfg = dict(embed_dim=(64, 192, 384), depth=(1, 2, 10), num_heads=(1, 3, 6))
    return ConvolutionalVisionTransformer(**{**cfg, **kwargs})


@register_model
def cvt_21(**kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-21: widths (64, 192, 384), depths (1, 4, 16), 224 px (Wu et al., 2021)."""
    cfg = dict(embed_dim=(64, 192, 384), depth=(1, 4, 16), num_heads=(1, 3, 6))
    return ConvolutionalVisionTransformer(**{**cfg, **kwargs})


@register_model
def cvt_w24(**kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-W24: widths (192, 768, 1024), depths (2, 2, 20), 224 px (Wu et al., 2021)."""
    cfg = dict(embed_dim=(192, 768, 1024), depth=(2, 2, 20), num_heads=(3, 12, 16))
    return ConvolutionalVisionTransformer(**{**cfg, **kwargs})


@register_model
def cvt_13_3d(**kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-13 on volumes: one channel, 96^3 crops, no head (multi-scale features for a decoder)."""
    cfg = dict(
        embed_dim=(64, 192, 384), depth=(1, 2, 10), num_heads=(1, 3, 6), img_size=96, in_chans=1, num_classes=0,
        spatial_dims=3,
    )
    return ConvolutionalVisionTransformer(**{**cfg, **kwargs})
