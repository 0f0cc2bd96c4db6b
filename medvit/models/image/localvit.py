"""LocalViT: DeiT with a depthwise convolution in every feed-forward.

Li et al., "LocalViT: Bringing Locality to Vision Transformers", arXiv:2104.05707, 2021.

The MLP of each block becomes an inverted residual on the patch-token grid
(`medvit.layers.conv_ffn.ConvFeedForward`): 1x1 conv, BN, h-swish; depthwise 3x3 conv, BN,
h-swish; squeeze-excite; 1x1 conv, BN - all convolutions without bias. As in the official
code (github.com/ofsoundof/LocalViT), this feed-forward has its own residual on the patch
tokens, no LayerNorm before it and no stochastic depth, and the class token skips it.

The registered models are the paper's LocalViT-T and LocalViT-S (official
`localvit_tiny_mlp4_act3_r192` and `localvit_small_mlp4_act3_r384`): expansion 4,
h-swish with squeeze-excite whose bottleneck is `hidden // 192` (T) or `hidden // 384`
(S) = 4 channels wide, giving the paper's 5.9M and 22.4M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch.nn as nn

from medvit.layers import Block, grid_for
from medvit.layers.conv_ffn import ConvFeedForward
from medvit.layers.helpers import to_ntuple
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model

ACTIVATIONS = {"hswish": nn.Hardswish, "relu6": nn.ReLU6}


class LocalViTBlock(Block):
    """A `Block` whose feed-forward carries its own residual: no norm or DropPath before it.

    Built with `mlp_layer=partial(ConvFeedForward, 2, pass_prefix=False, ...)`, so the block's
    `x + mlp(x)` is LocalViT's `x + conv(x)` on the patch tokens and leaves the class token
    as the attention left it.
    """

    def __init__(self, dim: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.norm2 = nn.Identity()
        self.drop_path2 = nn.Identity()


class LocalViT(VisionTransformer):
    """DeiT whose feed-forwards are locality (depthwise-conv) feed-forwards.

    Args:
        img_size: Input size (fixed: the feed-forwards are built for its token grid).
        patch_size: Patch extent.
        in_chans: Input channels.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: Expansion of the feed-forward.
        act: `hswish` (the paper's choice) or `relu6`.
        se_reduction: Squeeze-excite bottleneck = expanded width // `se_reduction`; None:
            no squeeze-excite.
        kernel_size: Depthwise kernel extent.
        **kwargs: The remaining `VisionTransformer` arguments (`num_classes`,
            `global_pool`, `class_token`, `drop_path_rate`, `freeze_patch_embed`, ...).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        act: str = "hswish",
        se_reduction: int | None = 192,
        kernel_size: int = 3,
        **kwargs: Any,
    ) -> None:
        for arg in ("dynamic_img_size", "spatial_dims"):
            if arg in kwargs:
                raise ValueError(
                    f"LocalViT does not take {arg}: it is 2D and its FFN is built for one token grid"
                )
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        hidden = int(embed_dim * mlp_ratio)
        if se_reduction is not None and (se_reduction < 1 or hidden // se_reduction < 1):
            raise ValueError(f"se_reduction {se_reduction} leaves no squeeze-excite channel of {hidden}")
        grid = grid_for(to_ntuple(img_size, 2, "img_size"), to_ntuple(patch_size, 2, "patch_size"))
        ffn = partial(
            ConvFeedForward,
            2,
            grid_size=grid,
            num_prefix_tokens=1 if kwargs.get("class_token", True) else 0,
            kernel_size=kernel_size,
            bias=False,
            se_reduction=se_reduction,
            pass_prefix=False,
        )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            act_layer=ACTIVATIONS[act],
            block_fn=partial(LocalViTBlock, mlp_layer=ffn),
            **kwargs,
        )


# -- registered variants ---------------------------------------------------------------
_LOCALVIT = dict(img_size=224, patch_size=16, depth=12, mlp_ratio=4.0, act="hswish")


@register_model
def localvit_tiny(**kwargs: Any) -> LocalViT:
    """LocalViT-T: width 192, 3 heads, expansion 4, h-swish, 224 px (Li et al., 2021)."""
    return LocalViT(**{**_LOCALVIT, **dict(embed_dim=192, num_heads=3, se_reduction=192), **kwargs})


@register_model
def localvit_small(**kwargs: Any) -> LocalViT:
    """LocalViT-S: width 384, 6 heads, expansion 4, h-swish, 224 px (Li et al., 2021)."""
    return LocalViT(**{**_LOCALVIT, **dict(embed_dim=384, num_heads=6, se_reduction=384), **kwargs})
