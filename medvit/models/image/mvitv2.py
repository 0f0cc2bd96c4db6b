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

import torch
import torch.nn as nn

from medvit.layers.conv_projection import ConvEmbed
from medvit.layers.drop import DropPath, drop_path_schedule
from medvit.layers.helpers import to_ntuple
from medvit.layers.mlp import Mlp
from medvit.layers.pooling_attention import PoolingAttention
from medvit.models._features import check_output_fmt, feature_take_indices
from medvit.registry import register_variant

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
        if max(stride_q) > 1:
            kernel = [s + 1 if s > 1 else s for s in stride_q]
            self.shortcut_pool_attn = nn.MaxPool2d(kernel, tuple(stride_q), [k // 2 for k in kernel])
        else:
            self.shortcut_pool_attn = None
        self.attn = PoolingAttention(
            dim, dim_out, feat_size, num_heads=num_heads, qkv_bias=qkv_bias, kernel_q=kernel_qkv,
            kernel_kv=kernel_qkv, stride_q=stride_q, stride_kv=stride_kv,
            residual_pooling=residual_pooling, norm_layer=norm_layer,
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def _shortcut_pool(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        if self.shortcut_pool_attn is None:
            return x
        b, _, c = x.shape
        x = self.shortcut_pool_attn(x.transpose(1, 2).reshape(b, c, *feat_size))
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        x_norm = self.norm1(x)
        # as in the reference: the shortcut is the un-normalised input unless it is projected
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        shortcut = self._shortcut_pool(shortcut, feat_size)
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


class MultiScaleVit(nn.Module):
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
        super().__init__()
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if len(depth) < 1 or min(depth) < 1:
            raise ValueError(f"depth must list >= 1 blocks per stage, got {tuple(depth)}")
        self.img_size = to_ntuple(img_size, 2, "img_size")
        total_stride = 4 * 2 ** (len(depth) - 1)
        if any(s % total_stride for s in self.img_size):
            raise ValueError(f"the network stride {total_stride} does not divide img_size {self.img_size}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.spatial_dims = 2
        self.num_prefix_tokens = 0

        self.patch_embed = ConvEmbed(in_chans, embed_dim, patch_size=7, stride=4, padding=3, norm_layer=None)
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        feat_size = [s // 4 for s in self.img_size]
        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stride_kv = stride_kv_adaptive
        dim = embed_dim
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []
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
        self.num_features = dim
        self.norm = norm_layer(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} differs from img_size {self.img_size}, "
                "which the relative position tables are built for"
            )
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of the last stage after the final norm, `(B, N, D)`."""
        x, feat_size = self._embed(x)
        for stage in self.stages:
            x, feat_size = stage(x, feat_size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(1)
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
        """Per-stage outputs (strides 4/8/16/32, widths `stage_channels`).

        Args:
            x: Input `(B, C, H, W)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Apply the final norm to the last stage's output (the only stage at its width).
            output_fmt: `NCHW` maps or `NLC` tokens.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The intermediates, or `(final_tokens, intermediates)` as `forward_features`.
        """
        check_output_fmt(output_fmt)
        take = feature_take_indices(len(self.stages), indices)
        last_stage = len(self.stages) - 1
        last = max(take) if (stop_early and intermediates_only) else last_stage
        x, feat_size = self._embed(x)
        feats = []
        for i, stage in enumerate(self.stages[: last + 1]):
            x, feat_size = stage(x, feat_size)
            if i in take:
                y = self.norm(x) if (norm and i == last_stage) else x
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(y.shape[0], -1, *feat_size)
                feats.append(y)
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _variant(name: str, tiny: dict, **cfg: object) -> None:
    register_variant(MultiScaleVit, name, tiny, **cfg)


_TINY = dict(embed_dim=16, depth=(1, 1, 1, 1), img_size=64, num_classes=10)
# Table 1 of the paper (T: 1-2-5-2, S: 1-2-11-2, B: 2-3-16-3), as timm's configurations.
_variant("mvitv2_tiny", _TINY, depth=(1, 2, 5, 2))
_variant("mvitv2_small", _TINY, depth=(1, 2, 11, 2))
_variant("mvitv2_base", _TINY, depth=(2, 3, 16, 3))
