"""Vision Longformer (ViL): a 4-stage multi-scale ViT with 2D sliding-window attention.

Zhang et al., "Multi-Scale Vision Longformer: A New Vision Transformer for
High-Resolution Image Encoding", ICCV 2021.

Each stage embeds the previous stage's map with a strided convolution and LayerNorm,
prepends its own learned global tokens, and runs `Block`s whose attention is
`LongformerAttention2d` (a window mask over full attention, 15 x 15 windows by default).
The last stage (7 x 7 tokens at 224) has no global token and its window covers the
whole grid, i.e. full attention, as in the paper's ViL configurations. The head is the
mean of the last stage's patch tokens after the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, PatchEmbed, check_pool_type, drop_path_schedule
from medvit.layers.helpers import to_ntuple
from medvit.layers.longformer_attention import LongformerAttention2d
from medvit.models._features import feature_take_last
from medvit.registry import register_model


def _per_stage(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} values (one per stage), got {len(value)}")
    return value


class ViLStage(nn.Module):
    """Patch embedding (conv + LayerNorm), global tokens and longformer blocks."""

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_global: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        rel_pos_bias: bool,
        drop_path: Sequence[float],
        proj_drop: float,
        attn_drop: float,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(2, img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer)
        self.grid_size = self.patch_embed.grid_size
        self.num_global = num_global
        self.global_tokens = (
            nn.Parameter(torch.randn(1, num_global, embed_dim) * 0.02) if num_global else None
        )
        attn_layer = partial(
            LongformerAttention2d,
            grid_size=self.grid_size,
            window_size=window_size,
            num_global=num_global,
            rel_pos_bias=rel_pos_bias,
        )
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    norm_layer=norm_layer,
                    attn_layer=attn_layer,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` map in, `(B, G + N, D)` tokens (global tokens first) out."""
        x = self.patch_embed(x)
        if self.global_tokens is not None:
            x = torch.cat([self.global_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        return self.blocks(x)

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a channels-first map `(B, D, H, W)`."""
        x = x[:, self.num_global :]
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)


class VisionLongformer(nn.Module):
    """Multi-scale Vision Longformer.

    Args:
        img_size: Input size (an int is repeated).
        patch_size: Patch size of each stage's embedding (4, 2, 2, 2: strides 4/8/16/32).
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` (mean of the last stage's patch tokens) or `` (no pooling).
        embed_dim: Width of each stage.
        depth: Blocks per stage.
        num_heads: Attention heads per stage.
        num_global: Global tokens per stage.
        window_size: Half-width `w` per stage; patch tokens attend to `(2w+1)^2` patches.
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Bias of the q/k/v projections.
        rel_pos_bias: 2D relative position bias in every attention layer.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear over all blocks).
        freeze_patch_embed: Keep the first stage's patch projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = (4, 2, 2, 2),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: Sequence[int] = (96, 192, 384, 768),
        depth: Sequence[int] = (1, 2, 8, 1),
        num_heads: Sequence[int] = (3, 3, 6, 12),
        num_global: int | Sequence[int] = (1, 1, 1, 0),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rel_pos_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            check_pool_type(global_pool)
            raise ValueError(f"ViL supports global_pool 'avg' or '', got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        n = len(tuple(embed_dim))
        embed_dim = tuple(embed_dim)
        depth = _per_stage(depth, n, "depth")
        num_heads = _per_stage(num_heads, n, "num_heads")
        num_global = _per_stage(num_global, n, "num_global")
        window_size = _per_stage(window_size, n, "window_size")
        patch_size = _per_stage(patch_size, n, "patch_size")
        if any(d < 1 for d in depth):
            raise ValueError(f"every stage needs at least one block, got depth={depth}")
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.spatial_dims = 2
        self.num_features = embed_dim[-1]
        self.stage_channels = list(embed_dim)

        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stages, size, chans, start, stride = [], self.img_size, in_chans, 0, 1
        self.stage_strides: list[int] = []
        for i in range(n):
            stage = ViLStage(
                size,
                patch_size[i],
                chans,
                embed_dim[i],
                depth[i],
                num_heads[i],
                num_global[i],
                window_size[i],
                mlp_ratio,
                qkv_bias,
                rel_pos_bias,
                dpr[start : start + depth[i]],
                proj_drop_rate,
                attn_drop_rate,
            )
            stages.append(stage)
            size, chans, start = stage.grid_size, embed_dim[i], start + depth[i]
            stride *= patch_size[i]
            self.stage_strides.append(stride)
        self.stages = nn.ModuleList(stages)
        if freeze_patch_embed:
            self.stages[0].patch_embed.requires_grad_(False)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _run(self, x: torch.Tensor, last: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stages 0..last; returns the last stage's tokens and every stage's map."""
        maps = []
        for stage in self.stages[: last + 1]:
            tokens = stage(x)
            x = stage.to_map(tokens)
            maps.append(x)
        return tokens, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's tokens after the final norm, `(B, G + N, D)` (global tokens first)."""
        tokens, _ = self._run(x, len(self.stages) - 1)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.stages[-1].num_global :].mean(dim=1)
        x = self.head_drop(x)
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
        """Per-stage patch-token maps (strides `stage_strides`), global tokens removed.

        Args:
            x: Input `(B, C, H, W)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Apply the final norm to the last stage's output (the only stage it
                belongs to).
            output_fmt: `NCHW` (`(B, C_i, H_i, W_i)`) or `NLC` (`(B, H_i*W_i, C_i)`).
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The maps, or `(forward_features output, maps)`.
        """
        n = len(self.stages)
        take, last = feature_take_last(n, indices, output_fmt, stop_early, intermediates_only)
        tokens, maps = self._run(x, last)
        feats = []
        for i in take:
            y = maps[i]
            if norm and i == n - 1:
                y = self.norm(y.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(y.shape)
            feats.append(y.flatten(2).transpose(1, 2) if output_fmt == "NLC" else y)
        if intermediates_only:
            return feats
        return self.norm(tokens), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"ViL supports global_pool 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# The paper's Table 1 (ViL-Tiny / ViL-Small: 1 global token in stages 1-3, window 15x15).
@register_model
def vil_tiny(**kwargs: Any) -> VisionLongformer:
    """ViL-Tiny: widths 48/96/192/384, depths 1/1/9/1, heads 1/3/3/6 (Zhang et al., 2021)."""
    cfg = dict(embed_dim=(48, 96, 192, 384), depth=(1, 1, 9, 1), num_heads=(1, 3, 3, 6))
    return VisionLongformer(**{**cfg, **kwargs})


@register_model
def vil_small(**kwargs: Any) -> VisionLongformer:
    """ViL-Small: widths 96/192/384/768, depths 1/2/8/1, heads 3/3/6/12 (Zhang et al., 2021)."""
    cfg = dict(embed_dim=(96, 192, 384, 768), depth=(1, 2, 8, 1), num_heads=(3, 3, 6, 12))
    return VisionLongformer(**{**cfg, **kwargs})
