"""Hybrid Vision Transformer: ViT tokens taken from a ResNet feature map instead of image patches.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021, Section 3.1 ("Hybrid Architecture") and its R50+ViT-B/16 model:
a ResNet-50 (GroupNorm + Weight Standardization, stage 4 removed and stage 3 extended
to 9 blocks) gives a stride-16 map whose positions, projected by a 1x1 convolution,
are the tokens of a ViT-B.

Parameter names follow timm's hybrid ViT (`patch_embed.backbone.*`, `patch_embed.proj`),
so its checkpoints load with the ViT converter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medvit.layers.hybrid_embed import HybridEmbed
from medvit.models.image.resnetv2 import ResNetV2
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class HybridVisionTransformer(VisionTransformer):
    """A `VisionTransformer` whose patch embedding is `HybridEmbed` over a `ResNetV2`.

    `VisionTransformer` builds a `PatchEmbed` itself and has no argument to build another
    embedding, so this subclass replaces `self.patch_embed` after `super().__init__`.
    The plain embedding is built with the same `img_size` and (effective) `patch_size`,
    so the token grid, the position table and the attributes `grid_size`, `patch_size`
    and `img_size` that the parent derived from it are exactly those of the hybrid
    embedding; only that short-lived projection is built in vain.

    Args:
        img_size: Input size.
        patch_size: Effective patch extent in input pixels: the backbone's stride
            (`4 * 2 ** (len(backbone_depths) - 1)`) times the projection kernel.
        in_chans: Input channels.
        embed_dim: Token width.
        backbone_depths: Bottleneck blocks per ResNet stage.
        backbone_channels: Output channels per ResNet stage.
        pre_norm: Norm before the blocks (the projection then has no bias, as in ViT).
        dynamic_img_size: Accept any input size the patch size divides.
        freeze_patch_embed: Keep the 1x1 patch projection fixed (MoCo v3's trick; the
            ResNet stays trainable, since freezing a random CNN is not that trick).
        **kwargs: The remaining `VisionTransformer` arguments (`depth`, `num_heads`,
            `global_pool`, `num_classes`, ...); `spatial_dims` is always 2.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        backbone_depths: Sequence[int] = (3, 4, 9),
        backbone_channels: Sequence[int] = (256, 512, 1024),
        pre_norm: bool = False,
        dynamic_img_size: bool = False,
        freeze_patch_embed: bool = False,
        **kwargs: Any,
    ) -> None:
        if "spatial_dims" in kwargs and kwargs.pop("spatial_dims") != 2:
            raise ValueError("the hybrid ViT is 2D only (its ResNet is a 2D CNN)")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            pre_norm=pre_norm,
            dynamic_img_size=dynamic_img_size,
            spatial_dims=2,
            **kwargs,
        )
        backbone = ResNetV2(
            depths=backbone_depths,
            channels=backbone_channels,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            img_size=img_size,
        )
        self.patch_embed = HybridEmbed(
            backbone,
            img_size,
            patch_size,
            embed_dim,
            bias=not pre_norm,
            strict_img_size=not dynamic_img_size,
        )
        self.grid_size = self.patch_embed.grid_size
        self.patch_size = self.patch_embed.patch_size
        self.img_size = self.patch_embed.img_size
        if freeze_patch_embed:
            self.patch_embed.proj.requires_grad_(False)


# -- registered variants ---------------------------------------------------------------
_TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, backbone_depths=(1, 1, 1), num_classes=10)
_R50_S16_VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, backbone_depths=(3, 4, 9))


@register_model(tiny=_TINY)
def vit_base_r50_s16_224(**kwargs: Any) -> HybridVisionTransformer:
    """R50+ViT-B/16 hybrid at 224 x 224."""
    return HybridVisionTransformer(**{**_R50_S16_VIT_B, "img_size": 224, **kwargs})


@register_model(tiny=_TINY)
def vit_base_r50_s16_384(**kwargs: Any) -> HybridVisionTransformer:
    """R50+ViT-B/16 hybrid at 384 x 384 (the resolution of the paper's fine-tuned model)."""
    return HybridVisionTransformer(**{**_R50_S16_VIT_B, "img_size": 384, **kwargs})
