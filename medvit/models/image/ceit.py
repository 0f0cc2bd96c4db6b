"""CeiT: convolution-enhanced image transformer.

Yuan et al., "Incorporating Convolution Designs into Visual Transformers", ICCV 2021.

Three changes to DeiT:

- Image-to-tokens (I2T) stem: conv 7x7/2 + BN + max-pool 3x3/2 gives a quarter-resolution
  feature map whose 4x4 patches are projected to tokens (16x16 pixels per token, as DeiT).
- Locally-enhanced feed-forward (LeFF, `medvit.layers.conv_ffn.ConvFeedForward`): the
  patch tokens go back to their grid, are expanded, filtered by a depthwise 3x3 conv and
  projected back, with BN after each step; the class token passes through.
- Layer-wise class-token attention (LCA): the class tokens of all blocks, plus a learned
  per-layer embedding, go through one more transformer block in which only the last
  block's class token queries the others; its output is the class token used for
  classification.

Details follow the authors' released code (github.com/coeusguo/ceit): 64 stem channels,
biases and BN in all three LeFF convolutions and no activation after the last one, and the
per-layer embedding `pos_layer_embed` of LCA. With these the parameter counts are the
paper's (CeiT-T 6.4M, CeiT-S 24.2M).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, grid_for
from medvit.layers.attention_capture import attention_layout
from medvit.layers.conv_ffn import ConvFeedForward
from medvit.layers.helpers import to_ntuple
from medvit.layers.hybrid_embed import HybridEmbed
from medvit.models._features import feature_take_last, format_intermediate
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class Image2Tokens(nn.Module):
    """CeiT's I2T stem: conv 7x7/2 (no bias) + BN + max-pool 3x3/2, stride 4 in all.

    It is the backbone of a `HybridEmbed`, whose projection (kernel = patch size / 4)
    makes the tokens.

    Args:
        in_chans: Input channels.
        width: Output channels.
    """

    def __init__(self, in_chans: int = 3, width: int = 64) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.num_features = width
        self.reduction = 4
        self.spatial_dims = 2
        self.conv = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.bn(self.conv(x)))


class CeiT(VisionTransformer):
    """DeiT with the I2T stem, LeFF feed-forwards and layer-wise class-token attention.

    `forward_features` returns the normed tokens of the last block with the class token
    replaced by LCA's output, so the `token` head classifies from LCA as in the paper.

    Args:
        img_size: Input size (fixed: LeFF is built for its token grid).
        patch_size: Effective patch extent in input pixels (4 x the patch on the stem's
            quarter-resolution map).
        in_chans: Input channels.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: Expansion of the LeFF (and of LCA's MLP).
        qkv_bias: Bias of the q/k/v projections.
        stem_width: Channels of the I2T stem.
        leff_kernel: Depthwise kernel extent of LeFF.
        lca: Classify from the layer-wise class-token attention; False: from the last
            block's class token (the paper's ablation).
        norm_eps: LayerNorm epsilon.
        act_layer: Activation of LeFF and of LCA's MLP.
        freeze_patch_embed: Keep the patch projection fixed (MoCo v3's trick; the stem
            before it stays trainable).
        **kwargs: The remaining `VisionTransformer` arguments (`num_classes`,
            `global_pool`, `drop_path_rate`, ...).
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
        qkv_bias: bool = True,
        stem_width: int = 64,
        leff_kernel: int = 3,
        lca: bool = True,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
        **kwargs: Any,
    ) -> None:
        for arg in ("dynamic_img_size", "spatial_dims"):
            if arg in kwargs:
                raise ValueError(f"CeiT does not take {arg}: it is 2D and LeFF is built for one token grid")
        if kwargs.get("class_token") is False:
            raise ValueError("CeiT needs its class token (LeFF and LCA are built around it)")
        grid = grid_for(to_ntuple(img_size, 2, "img_size"), to_ntuple(patch_size, 2, "patch_size"))
        leff = partial(ConvFeedForward, 2, grid_size=grid, num_prefix_tokens=1, kernel_size=leff_kernel)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_eps=norm_eps,
            act_layer=act_layer,
            block_fn=partial(Block, mlp_layer=leff),
            **kwargs,
        )
        # Same img_size and effective patch size as the plain embedding the parent built,
        # so its grid, position table and attributes stay valid.
        self.patch_embed = HybridEmbed(Image2Tokens(in_chans, stem_width), img_size, patch_size, embed_dim)
        if freeze_patch_embed:
            self.patch_embed.proj.requires_grad_(False)
        self.lca: Block | None = None
        self.pos_layer_embed: nn.Parameter | None = None
        if lca:
            self.pos_layer_embed = nn.Parameter(torch.zeros(1, depth, embed_dim))
            self.lca = Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=partial(nn.LayerNorm, eps=norm_eps),
                act_layer=act_layer,
            )
            for m in self.lca.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def _run_blocks(
        self, x: torch.Tensor, last: int, take: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Blocks 0..last; the class token after each, and the outputs of blocks in `take`."""
        cls_tokens, taken = [], []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = blk(x)
            cls_tokens.append(x[:, 0])
            if i in take:
                taken.append(x)
        return x, cls_tokens, taken

    def _finish(self, x: torch.Tensor, cls_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Replace the class token by LCA's output and apply the final norm."""
        if self.lca is not None:
            # the last class token is the only query that matters: its output does not
            # depend on the other rows, so running the plain block and keeping it is LCA
            with attention_layout(kind="sequence"):  # one class token per layer: no place in the image
                c = self.lca(torch.stack(cls_tokens, dim=1) + self.pos_layer_embed)[:, -1:]
            x = torch.cat([c, x[:, 1:]], dim=1)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens `(B, 1 + N, D)` of the last block, the class token from LCA."""
        x, _ = self.embed(x)
        x, cls_tokens, _ = self._run_blocks(x, len(self.blocks) - 1)
        return self._finish(x, cls_tokens)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected blocks, as channels-first maps or token sequences.

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, H, W)`.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, grid = self.embed(x)
        x, cls_tokens, taken = self._run_blocks(x, last, take)
        final_norm = self.norm if norm else None
        feats = [format_intermediate(y, grid, output_fmt, final_norm, 1) for y in taken]
        return feats if intermediates_only else (self._finish(x, cls_tokens), feats)


# -- registered variants ---------------------------------------------------------------
# Table 1 of the paper: DeiT's Ti/S widths and depth, LeFF expansion 4, kernel 3.
_CEIT = dict(img_size=224, patch_size=16, mlp_ratio=4.0, depth=12)


@register_model
def ceit_tiny(**kwargs: Any) -> CeiT:
    """CeiT-T, width 192, 3 heads, 224 px (Yuan et al., 2021)."""
    return CeiT(**{**_CEIT, **dict(embed_dim=192, num_heads=3), **kwargs})


@register_model
def ceit_small(**kwargs: Any) -> CeiT:
    """CeiT-S, width 384, 6 heads, 224 px (Yuan et al., 2021)."""
    return CeiT(**{**_CEIT, **dict(embed_dim=384, num_heads=6), **kwargs})
