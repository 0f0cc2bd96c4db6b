"""PVT v2 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", CVMJ 2022).

Four stages at strides 4/8/16/32, each an overlapping patch embedding (7/4 stem, then
3/2), blocks of spatial-reduction attention (or its linear, pooled form) and a
convolutional feed-forward, and a LayerNorm. No position embedding. The same code runs
on volumes with `spatial_dims=3`; SegFormer's Mix Transformer (`mit.py`) reuses it.
Parameter names follow timm's `PyramidVisionTransformerV2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.block import Block
from medvit.layers.conv_mlp import DWConvMlp
from medvit.layers.drop import drop_path_schedule
from medvit.layers.overlap_embed import OverlapPatchEmbed
from medvit.layers.sra import SpatialReductionAttention, check_sra_grid
from medvit.layers.token_map import map_to_tokens, tokens_to_map
from medvit.models._features import feature_take_last
from medvit.models.image._pyramid import PyramidBackbone
from medvit.registry import register_model

# the papers' code normalises blocks and stages with eps 1e-6, the embeddings with 1e-5
_NORM = partial(nn.LayerNorm, eps=1e-6)


class PvtV2Block(Block):
    """`Block` that hands the token grid of its input to the attention and feed-forward.

    Both convolve over the token map; taking the grid at every call (from the stage's
    embedding) instead of from construction lets one set of weights run at any input size.
    The sub-layers are built exactly as `Block` builds them.
    """

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), grid)))


class PyramidVisionTransformerStage(nn.Module):
    """Downsampling embedding (none in the first stage), blocks, LayerNorm.

    Runs at any input size: the token grid comes from the map it is given.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        dim: Input channels.
        dim_out: Token width of the stage.
        depth: Number of blocks.
        in_size: Spatial size of the input map the model is built for.
        downsample: Embed with a 3/2 overlapping conv; False: the map keeps its grid.
        num_heads: Attention heads.
        sr_ratio: Spatial reduction of the keys/values.
        linear: Linear (pooled) SRA, with a ReLU in the feed-forward.
        mlp_ratio: Hidden width of the feed-forward relative to `dim_out`.
        qkv_bias: Bias of the query and key/value projections.
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
        downsample: bool = True,
        num_heads: int = 1,
        sr_ratio: int = 1,
        linear: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.downsample: OverlapPatchEmbed | None = None
        if downsample:
            self.downsample = OverlapPatchEmbed(spatial_dims, tuple(in_size), 3, 2, dim, dim_out)
        elif dim != dim_out:
            raise ValueError(
                f"a stage without downsampling keeps its width, got {dim} -> {dim_out}"
            )
        attn = partial(SpatialReductionAttention, spatial_dims, sr_ratio=sr_ratio, linear=linear)
        mlp = partial(DWConvMlp, spatial_dims, extra_relu=linear)
        dpr = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            PvtV2Block(
                dim_out, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                attn_drop=attn_drop, drop_path=dpr[i], norm_layer=_NORM, attn_layer=attn,
                mlp_layer=mlp,
            )
            for i in range(depth)
        )
        self.norm = _NORM(dim_out)
        # the grid at the size the model is built for; checked now so a bad img_size fails early
        self.grid_size = self.output_size(in_size)

    def output_size(self, in_size: Sequence[int]) -> tuple[int, ...]:
        """Token grid of this stage for an input map of spatial size `in_size`.

        Raises:
            ValueError: The grid is too small for the stage's spatial reduction.
        """
        grid = tuple(in_size)
        if self.downsample is not None:
            grid = self.downsample.output_size(grid)
        return check_sra_grid(self.spatial_dims, grid, self.sr_ratio, self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-first map in, channels-first map out."""
        if self.downsample is not None:
            x, grid = self.downsample(x)
        else:
            grid = tuple(x.shape[2:])
            x = map_to_tokens(x)
        for blk in self.blocks:
            x = blk(x, grid)
        return tokens_to_map(self.norm(x), grid)[1]


class PyramidVisionTransformerV2(PyramidBackbone):
    """PVT v2 / Mix Transformer backbone with an average-pooled linear classifier.

    There is no position table, so the same weights run at any input size whose every
    stage's token grid is at least that stage's reduction ratio; `img_size` is the size
    the model is built and checked for.

    Args:
        img_size: Nominal input spatial size; an int is repeated over `spatial_dims`.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 returns the pooled features.
        global_pool: "avg" (average of the last stage's tokens) or "" (no pooling).
        depth: Blocks per stage.
        embed_dim: Width per stage.
        num_heads: Attention heads per stage.
        sr_ratios: Key/value spatial reduction per stage.
        mlp_ratio: Feed-forward expansion per stage (a number applies to all).
        qkv_bias: Bias of the query and key/value projections.
        linear: Linear SRA (PVT v2-li).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the projections.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        spatial_dims: 2 for images, 3 for volumes.
        freeze_patch_embed: Keep the stem's patch projection fixed (MoCo v3).
    """

    pool_types = ("avg", "")

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depth: Sequence[int] = (3, 4, 6, 3),
        embed_dim: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float | Sequence[float] = (8.0, 8.0, 4.0, 4.0),
        qkv_bias: bool = True,
        linear: bool = False,
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
        self.patch_embed = OverlapPatchEmbed(spatial_dims, self.img_size, 7, 4, in_chans, embed_dim[0])
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stages, size, prev, cur = [], self.patch_embed.grid_size, embed_dim[0], 0
        for i in range(n):
            stage = PyramidVisionTransformerStage(
                spatial_dims, prev, embed_dim[i], depth[i], size, downsample=i > 0, num_heads=num_heads[i],
                sr_ratio=sr_ratios[i], linear=linear, mlp_ratio=ratios[i], qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur : cur + depth[i]],
            )
            stages.append(stage)
            size, prev, cur = stage.grid_size, embed_dim[i], cur + depth[i]
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def check_input_size(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """The token grid of every stage for an input of spatial size `size`.

        Raises:
            ValueError: `size` is not a valid input size (wrong dims, or a stage's grid
                smaller than its reduction ratio).
        """
        size = tuple(size)
        grids = []
        try:
            grid = self.patch_embed.output_size(size)
            for stage in self.stages:
                grid = stage.output_size(grid)
                grids.append(grid)
        except ValueError as e:
            raise ValueError(f"input size {size} does not fit {type(self).__name__}: {e}") from None
        return grids

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem tokens as a channels-first map, after checking the input's size."""
        if x.ndim == self.spatial_dims + 2:
            self.check_input_size(x.shape[2:])
        x, grid = self.patch_embed(x)
        return tokens_to_map(x, grid)[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's channels-first map."""
        return self.stages(self._embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=tuple(range(2, x.ndim)))
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

        Args:
            x: Input batch.
            indices: Stages to return (None: all, n: the last n, or a list).
            norm: Unused: every stage already ends in its LayerNorm.
            output_fmt: "NCHW" maps or "NLC" token sequences.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).
        """
        take, last = feature_take_last(len(self.stages), indices, output_fmt, stop_early, intermediates_only)
        out = []
        x = self._embed(x)
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                out.append(x if output_fmt == "NCHW" else x.flatten(2).transpose(1, 2))
        return out if intermediates_only else (x, out)


_B_NARROW = dict(embed_dim=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))
_B_WIDE = dict(embed_dim=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))


@register_model
def pvt_v2_b0(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B0: widths 32/64/160/256, depths 2/2/2/2 (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(2, 2, 2, 2), **_B_NARROW), **kwargs})


@register_model
def pvt_v2_b1(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B1: widths 64/128/320/512, depths 2/2/2/2 (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(2, 2, 2, 2), **_B_WIDE), **kwargs})


@register_model
def pvt_v2_b2(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B2: widths 64/128/320/512, depths 3/4/6/3 (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(3, 4, 6, 3), **_B_WIDE), **kwargs})


@register_model
def pvt_v2_b2_li(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B2-Li: B2 with linear (pooled) spatial-reduction attention (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(3, 4, 6, 3), linear=True, **_B_WIDE), **kwargs})


@register_model
def pvt_v2_b3(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B3: widths 64/128/320/512, depths 3/4/18/3 (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(3, 4, 18, 3), **_B_WIDE), **kwargs})


@register_model
def pvt_v2_b4(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B4: widths 64/128/320/512, depths 3/8/27/3 (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(3, 8, 27, 3), **_B_WIDE), **kwargs})


@register_model
def pvt_v2_b5(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B5: widths 64/128/320/512, depths 3/6/40/3, MLP ratio 4 (Wang et al., 2022)."""
    return PyramidVisionTransformerV2(**{**dict(depth=(3, 6, 40, 3), mlp_ratio=4.0, **_B_WIDE), **kwargs})


@register_model
def pvt_v2_b0_3d(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVT v2-B0 in 3D: one input channel (CT/MR), 96^3 crops."""
    cfg = dict(depth=(2, 2, 2, 2), **_B_NARROW, img_size=(96, 96, 96), in_chans=1, spatial_dims=3)
    return PyramidVisionTransformerV2(**{**cfg, **kwargs})
