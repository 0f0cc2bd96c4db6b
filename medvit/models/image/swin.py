"""Swin Transformer, for 2D images and (with `spatial_dims=3`) volumes.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021. The 3D form (3D windows, relative position table and shifted-window mask,
2 x 2 x 2 patch merging) is the encoder of Swin-UNETR (Hatamizadeh et al., 2022).

Feature grids are kept channels-last `(B, *grid, C)` between blocks, as in timm, whose
parameter names are mirrored (`layers.N.blocks.M.attn.relative_position_bias_table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, PatchEmbed, drop_path_schedule
from medvit.layers.helpers import to_ntuple
from medvit.layers.window_attention import PatchMerging, WindowAttention, relative_position_index
from medvit.models._features import check_output_fmt, feature_take_indices
from medvit.registry import register_model

SWIN_POOL_TYPES = ("avg", "")
BIAS_TABLES = ("window", "full")
INTERMEDIATE_TAPS = ("stage", "merged")


def _check_pool(global_pool: str) -> str:
    if global_pool not in SWIN_POOL_TYPES:
        raise ValueError(f"global_pool must be one of {SWIN_POOL_TYPES}, got {global_pool!r}")
    return global_pool


class FullTableWindowAttention(WindowAttention):
    """Window attention whose window shrank to the grid, biased as MONAI's Swin-UNETR does.

    MONAI keeps the bias table of the configured (full) window and indexes it with the
    top-left `n x n` block of the full window's index (`n` = tokens of the shrunk window),
    which is not a function of the shrunk window's relative offsets; its checkpoints only
    reproduce with this table and index.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        full_window: The configured window, whose table is kept.
        **kwargs: `WindowAttention` arguments (`window_size` is the shrunk window).
    """

    def __init__(self, dim: int, num_heads: int, full_window: Sequence[int], **kwargs: object) -> None:
        super().__init__(dim, num_heads, **kwargs)
        n = self.window_area
        table = math.prod(2 * w - 1 for w in full_window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.relative_position_index = relative_position_index(full_window)[:n, :n].reshape(-1)


class SwinStage(nn.Module):
    """Optional patch merging, then blocks alternating regular and shifted windows.

    Args:
        dim: Input width.
        out_dim: Width of the stage (after merging).
        grid: Token grid of the stage's input at the model's `img_size`; windows no larger
            than the grid are shrunk to it and not shifted, as in the reference code.
        depth: Number of blocks.
        num_heads: Attention heads.
        window_size: Window extent per spatial dimension.
        downsample: Merge 2 x 2 (x 2) patches first.
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Bias of the q/k/v projections.
        proj_drop: Dropout after projections.
        attn_drop: Dropout on attention weights.
        drop_path: Per-block stochastic-depth probabilities.
        norm_layer: Norm class.
        bias_table: `window` (a table for the window actually used, as timm) or `full`
            (the configured window's table where the window shrinks, as MONAI).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        grid: Sequence[int],
        depth: int,
        num_heads: int,
        window_size: Sequence[int],
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        bias_table: str = "window",
    ) -> None:
        super().__init__()
        spatial_dims = len(window_size)
        if downsample:
            self.downsample: nn.Module = PatchMerging(spatial_dims, dim, out_dim, norm_layer)
            grid = tuple((g + 1) // 2 for g in grid)
        else:
            self.downsample = nn.Identity()
        self.grid_size = tuple(grid)
        window = tuple(min(w, g) for w, g in zip(window_size, grid))
        shift = tuple(0 if g <= w else w // 2 for w, g in zip(window_size, grid))
        self.window_size = window
        drop_path = list(drop_path) or [0.0] * depth
        attn_layer: Callable[..., nn.Module] = WindowAttention
        if bias_table == "full" and window != tuple(window_size):
            attn_layer = partial(FullTableWindowAttention, full_window=tuple(window_size))
        self.blocks = nn.Sequential(
            *[
                Block(
                    out_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    norm_layer=norm_layer,
                    attn_layer=partial(
                        attn_layer,
                        window_size=window,
                        shift_size=shift if i % 2 else (0,) * spatial_dims,
                    ),
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinTransformer(nn.Module):
    """Hierarchical ViT with (shifted) window attention and patch merging between stages.

    Args:
        img_size: Input spatial size; an int is repeated over `spatial_dims`. Other input
            sizes divisible by the patch size also run (grids are padded to windows).
        patch_size: Patch extent (stride of the first stage).
        in_chans: Input channels.
        num_classes: Classes of the linear head; 0 returns the pooled features.
        global_pool: `avg` (mean over the final grid) or `` (no pooling: the head is
            applied to every position of the `(B, *grid, C)` map).
        embed_dim: Width of the first stage; it doubles at every merge.
        depth: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window extent (an int is repeated over `spatial_dims`).
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Bias of the q/k/v projections.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        norm_layer: Norm class.
        patch_norm: LayerNorm after the patch embedding.
        spatial_dims: 2 for images, 3 for volumes `(B, C, D, H, W)`.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
        final_merge: Append a merge-only stage (patch merging, no blocks), as MONAI's Swin
            encoder merges after its last stage too; it adds one entry to `stage_channels`.
        final_norm: Build the final norm (False: `forward_features` returns the raw map).
        bias_table: `window` or `full`: the relative-bias table of a window shrunk to a
            small grid (see `SwinStage`).
        intermediate_taps: What `forward_intermediates` returns per stage: `stage` (its
            output) or `merged` (its input after patch merging, i.e. the patch embedding
            output for the first stage, as MONAI's Swin-UNETR encoder returns them).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depth: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        patch_norm: bool = True,
        spatial_dims: int = 2,
        freeze_patch_embed: bool = False,
        final_merge: bool = False,
        final_norm: bool = True,
        bias_table: str = "window",
        intermediate_taps: str = "stage",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if bias_table not in BIAS_TABLES:
            raise ValueError(f"bias_table must be one of {BIAS_TABLES}, got {bias_table!r}")
        if intermediate_taps not in INTERMEDIATE_TAPS:
            raise ValueError(f"intermediate_taps must be one of {INTERMEDIATE_TAPS}, got {intermediate_taps!r}")
        self.intermediate_taps = intermediate_taps
        depth, num_heads = tuple(depth), tuple(num_heads)
        if len(depth) != len(num_heads) or not depth or min(depth) < 1:
            raise ValueError(
                f"depth and num_heads need one positive entry per stage, got {depth} and {num_heads}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.global_pool = _check_pool(global_pool)
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.window_size = to_ntuple(window_size, spatial_dims, "window_size")
        self.patch_embed = PatchEmbed(
            spatial_dims,
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            norm_layer=norm_layer if patch_norm else None,
            strict_img_size=False,
        )
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        self.img_size = self.patch_embed.img_size
        self.patch_size = self.patch_embed.patch_size
        n = len(depth)
        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        if final_merge:
            depth, num_heads = depth + (0,), num_heads + num_heads[-1:]
            n += 1
        self.stage_channels = [embed_dim * 2**i for i in range(n)]
        self.stage_strides = [self.patch_size[0] * 2**i for i in range(n)]
        self.num_features = self.stage_channels[-1]
        grid: Sequence[int] = self.patch_embed.grid_size
        stages = []
        for i in range(n):
            stage = SwinStage(
                self.stage_channels[max(i - 1, 0)],
                self.stage_channels[i],
                grid,
                depth[i],
                num_heads[i],
                self.window_size,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depth[:i]) : sum(depth[: i + 1])],
                norm_layer=norm_layer,
                bias_table=bias_table,
            )
            grid = stage.grid_size
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a channels-last grid `(B, *grid, C)`."""
        tokens = self.patch_embed(x)
        grid = [s // p for s, p in zip(x.shape[2:], self.patch_size)]
        return tokens.reshape(x.shape[0], *grid, tokens.shape[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final stage output, normalised, channels-last `(B, *grid, C)`."""
        return self.norm(self.layers(self._embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the final grid and classify (or return the pooled vector with `pre_logits`)."""
        if self.global_pool == "avg":
            x = x.mean(dim=tuple(range(1, x.ndim - 1)))
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
        """Outputs of selected stages (not blocks): strides `stage_strides`, widths `stage_channels`.

        With `intermediate_taps="merged"` each stage's merged input is returned instead
        (same stride and width).

        Args:
            x: Input images or volumes.
            indices: Stages to return (None = all, n = the last n, or a list of indices).
            norm: Apply the final norm to the last stage's output (the only stage it fits).
            output_fmt: `NCHW` channels-first maps `(B, C, *grid)` (`NCDHW` in 3D), or
                `NLC` token sequences.
            intermediates_only: Return only the list.
            stop_early: Skip the stages after the last requested one.

        Returns:
            The list of stage outputs, or `(final features, list)`; the final features
            are those of `forward_features` when every stage ran.
        """
        check_output_fmt(output_fmt)
        n = len(self.layers)
        take = feature_take_indices(n, indices)
        last = max(take) if stop_early else n - 1
        x = self._embed(x)
        out = []
        for i, stage in enumerate(self.layers[: last + 1]):
            if self.intermediate_taps == "merged":
                x = stage.downsample(x)
                tap = x
                x = stage.blocks(x)
            else:
                x = stage(x)
                tap = x
            if i in take:
                y = self.norm(tap) if norm and i == n - 1 else tap
                if output_fmt == "NCHW":
                    y = y.movedim(-1, 1).contiguous()
                else:
                    y = y.flatten(1, -2)
                out.append(y)
        if intermediates_only:
            return out
        return (self.norm(x) if last == n - 1 else x), out

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SIZES = {
    "tiny": dict(embed_dim=96, depth=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depth=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depth=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


@register_model
def swin_tiny_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    """Swin-T, patch 4, window 7, 224 px (Liu et al., 2021)."""
    return SwinTransformer(**{**dict(img_size=224, patch_size=4, window_size=7, **_SIZES["tiny"]), **kwargs})


@register_model
def swin_small_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    """Swin-S, patch 4, window 7, 224 px (Liu et al., 2021)."""
    return SwinTransformer(**{**dict(img_size=224, patch_size=4, window_size=7, **_SIZES["small"]), **kwargs})


@register_model
def swin_base_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    """Swin-B, patch 4, window 7, 224 px (Liu et al., 2021)."""
    return SwinTransformer(**{**dict(img_size=224, patch_size=4, window_size=7, **_SIZES["base"]), **kwargs})


@register_model
def swin_tiny_patch4_window7_3d(**kwargs: Any) -> SwinTransformer:
    """Swin-T in 3D, patch 4, window 7: one input channel (CT/MR), 96^3 crops, features only."""
    cfg = dict(img_size=96, patch_size=4, window_size=7, in_chans=1, num_classes=0, spatial_dims=3, **_SIZES["tiny"])
    return SwinTransformer(**{**cfg, **kwargs})
