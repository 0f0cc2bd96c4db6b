"""Pooling-based Vision Transformer (PiT).

Heo et al., "Rethinking Spatial Dimensions of Vision Transformers", ICCV 2021.

Three transformer stages; between them the token grid is halved by a depthwise strided
convolution and the width doubled (`ConvTokenPool`), as a CNN does. Parameter names
follow timm's `PoolingVisionTransformer`, so its weights load with no mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, drop_path_schedule
from medvit.layers.conv_token_pool import ConvTokenPool
from medvit.layers.helpers import to_ntuple
from medvit.models._features import feature_take_last
from medvit.registry import register_model


class ConvEmbedding(nn.Module):
    """Overlapping patch embedding (a strided conv whose kernel exceeds its stride).

    Args:
        in_chans: Input channels.
        embed_dim: Output channels.
        img_size: Input size.
        patch_size: Kernel size.
        stride: Conv stride.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, img_size: tuple[int, int], patch_size: int, stride: int
    ) -> None:
        super().__init__()
        if patch_size < 1 or stride < 1:
            raise ValueError(f"patch_size and stride must be positive, got {patch_size}, {stride}")
        if min(img_size) < patch_size:
            raise ValueError(f"image size {img_size} is smaller than the patch size {patch_size}")
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in img_size)
        self.conv = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PitStage(nn.Module):
    """Optional pooling, then transformer blocks over `[prefix tokens, patch tokens]`.

    Args:
        dim: Token width of the stage.
        depth: Blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `dim`.
        pool: Pooling from the previous stage (None for the first stage).
        proj_drop: Dropout after attention/MLP projections.
        attn_drop: Dropout on attention weights.
        drop_path: Per-block stochastic-depth probabilities.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        pool: ConvTokenPool | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.pool = pool
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is not None:
            x, prefix = self.pool(x, prefix)
        b, c, h, w = x.shape
        n_prefix = prefix.shape[1]
        t = self.blocks(torch.cat([prefix, x.flatten(2).transpose(1, 2)], dim=1))
        return t[:, n_prefix:].transpose(1, 2).reshape(b, c, h, w), t[:, :n_prefix]


class PoolingVisionTransformer(nn.Module):
    """PiT: overlapping conv stem, position map, three stages joined by token pooling.

    Args:
        img_size: Input size (an int is repeated).
        patch_size: Stem kernel size.
        stride: Stem stride (the first stage's token stride).
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` (class token) or `` (`forward` returns the normed prefix tokens).
        embed_dim: Width of each stage (head width x heads in the paper).
        depth: Blocks per stage.
        num_heads: Heads per stage.
        mlp_ratio: MLP hidden width relative to the stage width.
        distilled: Add a distillation token and head (DeiT); eval output averages both heads.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear over all blocks).
        freeze_patch_embed: Keep the random stem projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        stride: int = 8,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: Sequence[int] = (64, 128, 256),
        depth: Sequence[int] = (2, 6, 4),
        num_heads: Sequence[int] = (2, 4, 8),
        mlp_ratio: float = 4.0,
        distilled: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", ""):
            raise ValueError(f"PiT supports global_pool 'token' or '', got {global_pool!r}")
        if not len(embed_dim) == len(depth) == len(num_heads) or not depth:
            raise ValueError("embed_dim, depth and num_heads need one entry per stage")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.spatial_dims = 2
        self.in_chans = in_chans
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.num_prefix_tokens = 2 if distilled else 1
        self.num_features = self.embed_dim = embed_dim[-1]

        self.patch_embed = ConvEmbedding(in_chans, embed_dim[0], self.img_size, patch_size, stride)
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        self.grid_size = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim[0], *self.grid_size))
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_prefix_tokens, embed_dim[0]))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stages, start = [], 0
        for i, (dim, d, h) in enumerate(zip(embed_dim, depth, num_heads)):
            pool = ConvTokenPool(embed_dim[i - 1], dim, stride=2) if i > 0 else None
            stages.append(
                PitStage(dim, d, h, mlp_ratio, pool, proj_drop_rate, attn_drop_rate, dpr[start : start + d])
            )
            start += d
        self.transformers = nn.ModuleList(stages)
        self.stage_channels = list(embed_dim)
        self.stage_strides = [stride * 2**i for i in range(len(depth))]
        self.norm = nn.LayerNorm(embed_dim[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.head_dist = self._new_head(num_classes) if distilled else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} does not match the model's img_size {self.img_size}"
            )
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        return x, self.cls_token.expand(x.shape[0], -1, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normed prefix tokens after the last stage, `(B, prefix, D)`."""
        x, prefix = self._embed(x)
        for stage in self.transformers:
            x, prefix = stage(x, prefix)
        return self.norm(prefix)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classify the class token (averaged with the distillation head when there is one)."""
        if self.global_pool == "":
            return x
        if self.head_dist is not None:
            a, b = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (a + b) / 2
            return (self.head(a) + self.head_dist(b)) / 2
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

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
        """Per-stage patch-token maps (strides `stage_strides`, widths `stage_channels`).

        Args:
            x: Input `(B, C, H, W)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Unused: the final norm applies only to the prefix tokens (kept for the
                common interface).
            output_fmt: `NCHW` (`(B, C, H, W)`) or `NLC` (`(B, H * W, C)`).
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The maps, or `(forward_features output, maps)`.
        """
        take, last = feature_take_last(len(self.transformers), indices, output_fmt, stop_early, intermediates_only)
        x, prefix = self._embed(x)
        feats = []
        for i, stage in enumerate(self.transformers[: last + 1]):
            x, prefix = stage(x, prefix)
            if i in take:
                feats.append(x.flatten(2).transpose(1, 2) if output_fmt == "NLC" else x)
        if intermediates_only:
            return feats
        return self.norm(prefix), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and the distillation head); 0 removes it."""
        if global_pool is not None:
            if global_pool not in ("token", ""):
                raise ValueError(f"PiT supports global_pool 'token' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)
        if self.head_dist is not None:
            self.head_dist = self._new_head(num_classes)


# -- registered variants ---------------------------------------------------------------
# The paper's Table 1 (stage width = head width x heads): Ti 32, XS/S 48, B 64 per head.
@register_model
def pit_ti_224(**kwargs: Any) -> PoolingVisionTransformer:
    """PiT-Ti: widths 64/128/256, depths 2/6/4, 224 px (Heo et al., 2021)."""
    cfg = dict(embed_dim=(64, 128, 256), depth=(2, 6, 4), num_heads=(2, 4, 8))
    return PoolingVisionTransformer(**{**cfg, **kwargs})


@register_model
def pit_xs_224(**kwargs: Any) -> PoolingVisionTransformer:
    """PiT-XS: widths 96/192/384, depths 2/6/4, 224 px (Heo et al., 2021)."""
    cfg = dict(embed_dim=(96, 192, 384), depth=(2, 6, 4), num_heads=(2, 4, 8))
    return PoolingVisionTransformer(**{**cfg, **kwargs})


@register_model
def pit_s_224(**kwargs: Any) -> PoolingVisionTransformer:
    """PiT-S: widths 144/288/576, depths 2/6/4, 224 px (Heo et al., 2021)."""
    cfg = dict(embed_dim=(144, 288, 576), depth=(2, 6, 4), num_heads=(3, 6, 12))
    return PoolingVisionTransformer(**{**cfg, **kwargs})


@register_model
def pit_b_224(**kwargs: Any) -> PoolingVisionTransformer:
    """PiT-B: patch 14 stride 7, widths 256/512/1024, depths 3/6/4, 224 px (Heo et al., 2021)."""
    cfg = dict(patch_size=14, stride=7, embed_dim=(256, 512, 1024), depth=(3, 6, 4), num_heads=(4, 8, 16))
    return PoolingVisionTransformer(**{**cfg, **kwargs})
