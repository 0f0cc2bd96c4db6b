"""PVT v1 (Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense
Prediction without Convolutions", ICCV 2021).

Four stages at strides 4/8/16/32, each a non-overlapping patch embedding (4, then 2)
with LayerNorm, a learned per-stage position embedding, and transformer blocks whose
attention takes keys/values from a map reduced by a strided conv + LayerNorm (SRA).
The class token joins in the last stage and feeds the classifier. The same code runs on
volumes with `spatial_dims=3`. There is no timm implementation; parameter names follow
the stage layout of `pvt_v2.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.block import Block
from medvit.layers.drop import drop_path_schedule
from medvit.layers.patch_embed import PatchEmbed
from medvit.layers.sra import SpatialReductionAttention
from medvit.layers.token_map import format_tokens, tokens_to_map
from medvit.models._features import feature_take_last
from medvit.models.image._pyramid import PyramidBackbone
from medvit.registry import register_model

# the paper's code normalises the blocks and the head with eps 1e-6, the embeddings with 1e-5
_NORM = partial(nn.LayerNorm, eps=1e-6)


class PvtStage(nn.Module):
    """Patch embedding + LayerNorm, position embedding (with the class token's), blocks.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        dim: Input channels.
        dim_out: Token width of the stage.
        depth: Number of blocks.
        in_size: Spatial size of the input map.
        patch_size: Patch extent (4 in the first stage, 2 after).
        num_heads: Attention heads.
        sr_ratio: Spatial reduction of the keys/values.
        mlp_ratio: Hidden width of the MLP relative to `dim_out`.
        qkv_bias: Bias of the query and key/value projections.
        class_token: This stage prepends the class token (the last stage).
        drop_rate: Dropout after adding the position embedding.
        proj_drop: Dropout after the projections.
        attn_drop: Dropout on the attention weights.
        drop_path: Per-block stochastic-depth probabilities.
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        dim_out: int,
        depth: int,
        in_size: Sequence[int],
        patch_size: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
        class_token: bool = False,
        drop_rate: float = 0.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(spatial_dims, in_size, patch_size, dim, dim_out, norm_layer=nn.LayerNorm)
        self.grid_size = self.patch_embed.grid_size
        self.num_prefix_tokens = int(class_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim_out)) if class_token else None
        n_pos = self.patch_embed.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, dim_out) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        attn = partial(
            SpatialReductionAttention, spatial_dims, grid_size=self.grid_size, sr_ratio=sr_ratio,
            num_prefix_tokens=self.num_prefix_tokens,
        )
        dpr = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            Block(
                dim_out, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                attn_drop=attn_drop, drop_path=dpr[i], norm_layer=_NORM, attn_layer=attn,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-first map in, tokens `(B, prefix + N, C)` out."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return x


class PyramidVisionTransformer(PyramidBackbone):
    """PVT v1 classifier/backbone.

    Args:
        img_size: Input spatial size; an int is repeated over `spatial_dims`.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 returns the pooled features.
        global_pool: "token" (the class token) or "avg" (mean of the last stage's patch tokens).
        depth: Blocks per stage.
        embed_dim: Width per stage.
        num_heads: Attention heads per stage.
        sr_ratios: Key/value spatial reduction per stage.
        mlp_ratio: MLP expansion per stage (a number applies to all).
        qkv_bias: Bias of the query and key/value projections.
        drop_rate: Dropout after the position embeddings and before the classifier.
        proj_drop_rate: Dropout after the projections.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        spatial_dims: 2 for images, 3 for volumes.
        freeze_patch_embed: Keep the first stage's patch projection fixed (MoCo v3).
    """

    pool_types = ("token", "avg")

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        depth: Sequence[int] = (2, 2, 2, 2),
        embed_dim: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float | Sequence[float] = (8.0, 8.0, 4.0, 4.0),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        spatial_dims: int = 2,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        ratios = self._configure(
            img_size, in_chans, num_classes, global_pool, depth, embed_dim, num_heads,
            sr_ratios, mlp_ratio, spatial_dims=spatial_dims,
        )
        n = len(depth)
        stride = 4 * 2 ** (n - 1)
        if any(s % stride for s in self.img_size):
            raise ValueError(
                f"the total stride {stride} does not divide the image size {self.img_size}"
            )
        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stages, size, prev, cur = [], self.img_size, in_chans, 0
        for i in range(n):
            stage = PvtStage(
                spatial_dims, prev, embed_dim[i], depth[i], size, 4 if i == 0 else 2, num_heads[i],
                sr_ratios[i], ratios[i], qkv_bias=qkv_bias, class_token=i == n - 1,
                drop_rate=drop_rate, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[cur : cur + depth[i]],
            )
            stages.append(stage)
            size, prev, cur = stage.grid_size, embed_dim[i], cur + depth[i]
        self.stages = nn.ModuleList(stages)
        if freeze_patch_embed:
            self.stages[0].patch_embed.requires_grad_(False)
        self.norm = _NORM(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def _run(
        self, x: torch.Tensor, last: int, take: list[int], fmt: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = []
        final = len(self.stages) - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i == final:
                x = self.norm(x)
            grid, prefix = stage.grid_size, stage.num_prefix_tokens
            if i in take:
                out.append(format_tokens(x, grid, prefix, fmt))
            if i < final:
                x = tokens_to_map(x, grid, prefix)[1]
        return x, out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens of the last stage, class token first."""
        return self._run(x, len(self.stages) - 1, [], "NLC")[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """Per-stage feature maps (strides `stage_strides`, widths `stage_channels`).

        The last stage's map is taken after the final norm, as the classifier sees it; the
        class token is removed.

        Args:
            x: Input batch.
            indices: Stages to return (None: all, n: the last n, or a list).
            norm: Unused: the final norm is part of the last stage's output.
            output_fmt: "NCHW" maps or "NLC" token sequences.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).
        """
        take, last = feature_take_last(len(self.stages), indices, output_fmt, stop_early, intermediates_only)
        x, out = self._run(x, last, take, output_fmt)
        return out if intermediates_only else (x, out)


@register_model
def pvt_tiny(**kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Tiny: depths 2/2/2/2 (Wang et al., 2021)."""
    return PyramidVisionTransformer(**{**dict(depth=(2, 2, 2, 2)), **kwargs})


@register_model
def pvt_small(**kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Small: depths 3/4/6/3 (Wang et al., 2021)."""
    return PyramidVisionTransformer(**{**dict(depth=(3, 4, 6, 3)), **kwargs})


@register_model
def pvt_medium(**kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Medium: depths 3/4/18/3 (Wang et al., 2021)."""
    return PyramidVisionTransformer(**{**dict(depth=(3, 4, 18, 3)), **kwargs})


@register_model
def pvt_large(**kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Large: depths 3/8/27/3 (Wang et al., 2021)."""
    return PyramidVisionTransformer(**{**dict(depth=(3, 8, 27, 3)), **kwargs})


@register_model
def pvt_tiny_3d(**kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Tiny in 3D: one input channel (CT/MR), 96^3 crops."""
    cfg = dict(depth=(2, 2, 2, 2), img_size=(96, 96, 96), in_chans=1, spatial_dims=3)
    return PyramidVisionTransformer(**{**cfg, **kwargs})
