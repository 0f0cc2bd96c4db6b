"""DeepViT: a deep ViT whose top blocks use re-attention.

Zhou et al., "DeepViT: Towards Deeper Vision Transformer", arXiv:2103.11886, 2021.

In deep ViTs the attention maps of the top blocks become nearly identical ("attention
collapse"); re-attention (`medvit.layers.reattention`) mixes the heads' maps after the
softmax so those blocks produce diverse maps again.

The configurations are those of the official code (github.com/zhoudaquan/dvit_repo,
`deepvit_S` and `deepvit_L`): width 396 / 420, 16 / 32 blocks, 12 heads, MLP ratio 3,
re-attention in the last 5 / 12 blocks (plain attention below), and a small conv stem
(conv 7x7/2 + BN + ReLU, conv 3x3 + BN + ReLU, then an 8x8 patch projection) instead of
the 16x16 patch projection. DeepViT-S also scales the re-generated maps by the attention
scale (`transform_scale`). The official blocks compute `norm(x * 0.5)` and add their
branches divided by 0.5 (`scale_adjustment`); a LayerNorm ignores the input scale, so
that only doubles every residual branch at initialisation and is left out here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Attention, Block
from medvit.layers.hybrid_embed import HybridEmbed
from medvit.layers.reattention import ReAttention
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class ConvStem(nn.Module):
    """DeepViT's stem: conv 7x7/2 + BN + ReLU, conv 3x3 + BN + ReLU (stride 2 in all).

    It is the backbone of a `HybridEmbed`, whose projection (kernel = patch size / 2)
    makes the tokens.

    Args:
        in_chans: Input channels.
        width: Channels of both convolutions.
    """

    def __init__(self, in_chans: int = 3, width: int = 64) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.num_features = width
        self.reduction = 2
        self.spatial_dims = 2
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(x)))


def _block_factory(depth: int, reattn_depth: int, scale_mixed: bool) -> Callable[..., Block]:
    """Blocks with plain attention, then re-attention in the last `reattn_depth` of them.

    `VisionTransformer` calls `block_fn` once per block, in order, so a counter gives the
    index of the block being built.
    """
    index = itertools.count()
    reattn = partial(ReAttention, scale_mixed=scale_mixed)

    def make(**kwargs: Any) -> Block:
        i = next(index)
        return Block(attn_layer=reattn if i >= depth - reattn_depth else Attention, **kwargs)

    return make


class DeepVisionTransformer(VisionTransformer):
    """ViT with re-attention in its top blocks and (optionally) DeepViT's conv stem.

    Args:
        img_size: Input size.
        patch_size: Effective patch extent in input pixels (the stem's stride 2 times the
            projection kernel with `conv_stem`).
        in_chans: Input channels.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        reattn_depth: How many of the last blocks use re-attention; None: all of them
            (the paper's DeepViT-16/24/32 ablations).
        scale_mixed: Scale the re-generated maps by `head_dim ** -0.5` (DeepViT-S).
        conv_stem: Use the conv stem instead of the plain patch projection.
        stem_width: Channels of the conv stem.
        dynamic_img_size: Accept any input size the patch size divides.
        freeze_patch_embed: Keep the patch projection fixed (MoCo v3's trick; the conv
            stem before it stays trainable).
        **kwargs: The remaining `VisionTransformer` arguments (`num_classes`,
            `global_pool`, `drop_path_rate`, ...); `spatial_dims` is always 2.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 396,
        depth: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 3.0,
        reattn_depth: int | None = None,
        scale_mixed: bool = False,
        conv_stem: bool = True,
        stem_width: int = 64,
        dynamic_img_size: bool = False,
        freeze_patch_embed: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("spatial_dims", 2) != 2:
            raise ValueError("DeepViT is 2D only")
        reattn_depth = depth if reattn_depth is None else reattn_depth
        if not 0 <= reattn_depth <= depth:
            raise ValueError(f"reattn_depth must be in [0, depth={depth}], got {reattn_depth}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dynamic_img_size=dynamic_img_size,
            freeze_patch_embed=freeze_patch_embed and not conv_stem,
            block_fn=_block_factory(depth, reattn_depth, scale_mixed),
            spatial_dims=2,
            **kwargs,
        )
        self.reattn_depth = reattn_depth
        if conv_stem:
            # Same img_size and effective patch size as the plain embedding the parent
            # built, so its grid, position table and attributes stay valid.
            self.patch_embed = HybridEmbed(
                ConvStem(in_chans, stem_width),
                img_size,
                patch_size,
                embed_dim,
                strict_img_size=not dynamic_img_size,
            )
            if freeze_patch_embed:
                self.patch_embed.proj.requires_grad_(False)


# -- registered variants ---------------------------------------------------------------
_DEEPVIT = dict(img_size=224, patch_size=16, mlp_ratio=3.0, num_heads=12)


@register_model
def deepvit_small(**kwargs: Any) -> DeepVisionTransformer:
    """DeepViT-S: width 396, 16 blocks, 5 re-attention, 27.3M parameters (paper: 27M) (Zhou et al., 2021)."""
    cfg = dict(embed_dim=396, depth=16, reattn_depth=5, scale_mixed=True)
    return DeepVisionTransformer(**{**_DEEPVIT, **cfg, **kwargs})


@register_model
def deepvit_large(**kwargs: Any) -> DeepVisionTransformer:
    """DeepViT-L: width 420, 32 blocks, 12 re-attention, 58.9M parameters (paper: 55M) (Zhou et al., 2021)."""
    cfg = dict(embed_dim=420, depth=32, reattn_depth=12)
    return DeepVisionTransformer(**{**_DEEPVIT, **cfg, **kwargs})
