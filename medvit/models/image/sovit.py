"""So-ViT: second-order pooling of the visual tokens beside the class token.

Xie et al., "So-ViT: Mind Visual Tokens for Vision Transformer", arXiv:2104.10935, 2021.

Two changes to a T2T-ViT-style backbone (same widths and depths, fixed sinusoidal
positions, no q/k/v bias):

- Classification head: besides the linear classifier of the class token, the visual
  (patch) tokens are pooled by their covariance, normalised by its matrix square root
  (iSQRT-COV's Newton-Schulz iteration, `medvit.layers.cov_pool.CovariancePool`),
  vectorised as the upper triangle and classified by a second linear layer; the two
  logits are summed.
- Visual-token embedding: a light-weight convolutional stem instead of patches - conv
  3x3 + max-pool 3x3/2, three ResNet bottlenecks of stride 2, a 1x1 projection - the
  "ResNet" module of the official code (github.com/jiangtaoxie/So-ViT).

The released code pools by a cross-covariance of two reductions (48 x 24 for So-ViT-7/10,
64 x 48 for So-ViT-14) normalised by a singular-value power; here the pooling is the
covariance with iSQRT-COV normalisation, with the reduced width `cov_dim` chosen so that
the vectorised representation is as wide as the released one (48 * 49 / 2 = 1176 ~ 1152,
78 * 79 / 2 = 3081 ~ 3072), which keeps the parameter counts of the released models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.bottleneck import Bottleneck
from medvit.layers.cov_pool import CovariancePool
from medvit.layers.hybrid_embed import HybridEmbed
from medvit.models.image.t2t_vit import T2TViT
from medvit.registry import register_model


class ResNetTokenStem(nn.Module):
    """So-ViT's token stem: conv 3x3 + max-pool 3x3/2, three stride-2 bottlenecks (stride 16).

    It is the backbone of a `HybridEmbed`, whose 1x1 projection makes the tokens.

    Args:
        in_chans: Input channels.
        width: Channels of the stem conv and bottleneck width; the bottlenecks output
            `4 * width`.
    """

    def __init__(self, in_chans: int = 3, width: int = 64) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.num_features = 4 * width
        self.reduction = 16
        self.spatial_dims = 2
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stages = nn.Sequential(
            Bottleneck(2, width, width, stride=2),
            Bottleneck(2, 4 * width, width, stride=2),
            Bottleneck(2, 4 * width, width, stride=2),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.maxpool(self.conv(x)))


class SoViT(T2TViT):
    """T2T-ViT-style backbone on the conv token stem, with the second-order head beside the class token's.

    `num_classes=0` (or `forward_head(pre_logits=True)`) gives the pooled vector
    `[class token, covariance features]`, of width `head_hidden_size`; `num_features`
    stays the token width, as for every backbone (decoders read it).

    Args:
        img_size: Input size; multiples of 16.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        token_dim: Width of the conv token stem.
        cov_dim: Width the visual tokens are reduced to before the covariance; None: no
            second-order head (the class-token head alone).
        cov_iters: Newton-Schulz iterations of the matrix square root.
        **kwargs: The remaining `T2TViT` / `VisionTransformer` arguments (`global_pool`,
            `drop_path_rate`, `freeze_patch_embed`, `dynamic_img_size`, ...).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        token_dim: int = 64,
        cov_dim: int | None = 78,
        cov_iters: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            img_size=img_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            token_dim=token_dim,
            **kwargs,
        )
        self.cov_pool = CovariancePool(embed_dim, cov_dim, cov_iters) if cov_dim is not None else None
        cov_features = self.cov_pool.num_features if self.cov_pool is not None else 0
        self.head_hidden_size = embed_dim + cov_features
        self.head_cov = self._cov_classifier(num_classes)
        if self.cov_pool is not None:
            nn.init.trunc_normal_(self.cov_pool.reduce.weight, std=0.02)

    def build_token_embed(
        self,
        img_size: int | Sequence[int],
        in_chans: int,
        embed_dim: int,
        token_dim: int,
        strict_img_size: bool,
    ) -> nn.Module:
        """The conv token stem and its 1x1 projection."""
        return HybridEmbed(
            ResNetTokenStem(in_chans, token_dim), img_size, 16, embed_dim, strict_img_size=strict_img_size
        )

    def _cov_classifier(self, num_classes: int) -> nn.Module | None:
        if self.cov_pool is None or num_classes == 0:
            return None
        head = nn.Linear(self.cov_pool.num_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class-token logits plus covariance logits (or the concatenated vectors with `pre_logits`)."""
        if self.cov_pool is None or not self.global_pool:
            return super().forward_head(x, pre_logits)
        pooled = super().forward_head(x, pre_logits=True)
        cov = self.cov_pool(x[:, self.num_prefix_tokens :])
        if pre_logits or self.num_classes == 0:
            return torch.cat([pooled, cov], dim=1)
        return self.head(pooled) + self.head_cov(cov)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace both classifiers (and optionally the pooling); 0 removes them."""
        super().reset_classifier(num_classes, global_pool)
        self.head_cov = self._cov_classifier(num_classes)


# -- registered variants ---------------------------------------------------------------
# Backbones of T2T-ViT-7/10/14 (the official So_vit_7/10/14).
@register_model
def so_vit_7(**kwargs: Any) -> SoViT:
    """So-ViT-7: width 256, depth 7, 4 heads, 224 px (Xie et al., 2021)."""
    cfg = dict(img_size=224, token_dim=64, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, cov_dim=48)
    return SoViT(**{**cfg, **kwargs})


@register_model
def so_vit_10(**kwargs: Any) -> SoViT:
    """So-ViT-10: width 256, depth 10, 4 heads, 224 px (Xie et al., 2021)."""
    cfg = dict(img_size=224, token_dim=64, embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, cov_dim=48)
    return SoViT(**{**cfg, **kwargs})


@register_model
def so_vit_14(**kwargs: Any) -> SoViT:
    """So-ViT-14: width 384, depth 14, 6 heads, 224 px (Xie et al., 2021)."""
    cfg = dict(img_size=224, token_dim=64, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, cov_dim=78)
    return SoViT(**{**cfg, **kwargs})
