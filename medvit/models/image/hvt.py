"""HVT: a ViT whose token sequence is max-pooled at stage boundaries.

Pan et al., "Scalable Vision Transformers with Hierarchical Pooling", ICCV 2021.

The `depth` blocks are split into `num_pool_stages` equal stages; each stage starts by
max-pooling the token sequence (1D, kernel 3, stride 2, over the row-major order of the
patch tokens) and adding a fresh learned position embedding of the pooled length. There
is no class token; the head averages the final tokens. With one stage the pooling comes
before the first block, which halves the FLOPs of the same-width DeiT, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.token_pool import TokenMaxPool1d
from medvit.models._features import check_output_fmt, feature_take_last
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class HierarchicalVisionTransformer(VisionTransformer):
    """ViT with hierarchical 1D max pooling of the tokens (no class token, GAP head).

    Args:
        num_pool_stages: Number of stages M; each starts with a pooling. Must divide `depth`.
        pool_kernel_size: Max-pooling window over consecutive tokens.
        pool_stride: Max-pooling stride.
        pool_padding: Max-pooling padding.
        global_pool: `avg` or `` (no pooling).
        **kwargs: `VisionTransformer` arguments (`img_size`, `patch_size`, `embed_dim`,
            `depth`, `num_heads`, `freeze_patch_embed`, ...). `class_token` and
            `dynamic_img_size` are fixed (False) since the stage position tables have
            fixed lengths.
    """

    def __init__(
        self,
        num_pool_stages: int = 1,
        pool_kernel_size: int = 3,
        pool_stride: int = 2,
        pool_padding: int = 0,
        global_pool: str = "avg",
        **kwargs: object,
    ) -> None:
        for fixed in ("class_token", "dynamic_img_size"):
            if kwargs.pop(fixed, False):
                raise ValueError(f"HVT does not support {fixed}=True")
        if global_pool not in ("avg", ""):
            raise ValueError(f"HVT supports global_pool 'avg' or '', got {global_pool!r}")
        super().__init__(class_token=False, global_pool=global_pool, **kwargs)
        depth = len(self.blocks)
        if num_pool_stages < 1 or depth % num_pool_stages != 0:
            raise ValueError(
                f"num_pool_stages ({num_pool_stages}) must be >= 1 and divide depth ({depth})"
            )
        self.num_pool_stages = num_pool_stages
        self.stage_depth = depth // num_pool_stages
        self.pool = TokenMaxPool1d(pool_kernel_size, pool_stride, pool_padding)
        lengths, n = [], self.patch_embed.num_patches
        for _ in range(num_pool_stages):
            n = self.pool.out_len(n)
            if n < 1:
                raise ValueError(
                    f"{num_pool_stages} poolings leave no tokens of the "
                    f"{self.patch_embed.num_patches} patches"
                )
            lengths.append(n)
        self.stage_lengths = lengths
        self.stage_pos_embed = nn.ParameterList(
            [nn.Parameter(torch.randn(1, n, self.embed_dim) * 0.02) for n in lengths]
        )
        for p in self.stage_pos_embed:
            nn.init.trunc_normal_(p, std=0.02)
        self.stage_channels = [self.embed_dim] * num_pool_stages
        # tokens are pooled in 1D, so a "stride" is input pixels per token, not a 2D step
        patch = self.patch_size[0] * self.patch_size[1]
        self.stage_strides = [patch * pool_stride ** (i + 1) for i in range(num_pool_stages)]

    def _stage(self, x: torch.Tensor, i: int) -> torch.Tensor:
        x = self.pool(x) + self.stage_pos_embed[i]
        return self.blocks[i * self.stage_depth : (i + 1) * self.stage_depth](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled tokens after the last block and the final norm, `(B, L_M, D)`."""
        x, _ = self.embed(x)
        for i in range(self.num_pool_stages):
            x = self._stage(x, i)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage pooled token sequences `(B, L_i, D)` (`stage_lengths`).

        Pooling is 1D over the flattened grid, so stage outputs have no 2D grid:
        only `NLC` is supported (the default here) and `NCHW` raises ValueError.

        Args:
            x: Input `(B, C, H, W)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Apply the final norm to each intermediate.
            output_fmt: `NLC`.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The sequences, or `(forward_features output, sequences)`.
        """
        check_output_fmt(output_fmt)
        if output_fmt != "NLC":
            raise ValueError("HVT pools tokens in 1D, so its stages have no grid: use output_fmt='NLC'")
        take, last = feature_take_last(self.num_pool_stages, indices, output_fmt, stop_early, intermediates_only)
        x, _ = self.embed(x)
        feats = []
        for i in range(last + 1):
            x = self._stage(x, i)
            if i in take:
                feats.append(self.norm(x) if norm else x)
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool not in ("avg", ""):
            raise ValueError(f"HVT supports global_pool 'avg' or '', got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)


# -- registered variants ---------------------------------------------------------------
# DeiT-Ti / DeiT-S widths (paper Table 1), M = 1 or 4 pooling stages, patch 16 at 224.
_HVT = dict(img_size=224, patch_size=16, depth=12)


@register_model
def hvt_ti_1(**kwargs: Any) -> HierarchicalVisionTransformer:
    """HVT-Ti-1: width 192, 3 heads, 1 pooling stage, 224 px (Pan et al., 2021)."""
    cfg = dict(embed_dim=192, num_heads=3, num_pool_stages=1)
    return HierarchicalVisionTransformer(**{**_HVT, **cfg, **kwargs})


@register_model
def hvt_ti_4(**kwargs: Any) -> HierarchicalVisionTransformer:
    """HVT-Ti-4: width 192, 3 heads, 4 pooling stages, 224 px (Pan et al., 2021)."""
    cfg = dict(embed_dim=192, num_heads=3, num_pool_stages=4)
    return HierarchicalVisionTransformer(**{**_HVT, **cfg, **kwargs})


@register_model
def hvt_s_1(**kwargs: Any) -> HierarchicalVisionTransformer:
    """HVT-S-1: width 384, 6 heads, 1 pooling stage, 224 px (Pan et al., 2021)."""
    cfg = dict(embed_dim=384, num_heads=6, num_pool_stages=1)
    return HierarchicalVisionTransformer(**{**_HVT, **cfg, **kwargs})


@register_model
def hvt_s_4(**kwargs: Any) -> HierarchicalVisionTransformer:
    """HVT-S-4: width 384, 6 heads, 4 pooling stages, 224 px (Pan et al., 2021)."""
    cfg = dict(embed_dim=384, num_heads=6, num_pool_stages=4)
    return HierarchicalVisionTransformer(**{**_HVT, **cfg, **kwargs})
