"""Hybrid Vision Transformer: ViT tokens taken from a ResNet feature map instead of image patches.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021, Section 3.1 ("Hybrid Architecture") and its R50+ViT-B/16 model:
a ResNet-50 (GroupNorm + Weight Standardization, stage 4 removed and stage 3 extended
to 9 blocks) gives a stride-16 map whose positions, projected by a 1x1 convolution,
are the tokens of a ViT-B. With `spatial_dims=3` the ResNet and the ViT are volumetric
(`vit_base_r50_s16_96_3d`, the encoder of the 3D TransUNet).

Parameter names follow timm's hybrid ViT (`patch_embed.backbone.*`, `patch_embed.proj`),
so its checkpoints load with the ViT converter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medvit.layers.hybrid_embed import HybridEmbed
from medvit.models.image.resnetv2 import ResNetV2
from medvit.models._features import check_output_fmt
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
        spatial_dims: 2 for images, 3 for volumes (a 3D ResNet and 3D tokens).
        **kwargs: The remaining `VisionTransformer` arguments (`depth`, `num_heads`,
            `global_pool`, `num_classes`, ...).
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
        spatial_dims: int = 2,
        **kwargs: Any,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"the hybrid ViT is 2D or 3D (its ResNet's), got spatial_dims={spatial_dims}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            pre_norm=pre_norm,
            dynamic_img_size=dynamic_img_size,
            spatial_dims=spatial_dims,
            **kwargs,
        )
        backbone = ResNetV2(
            depths=backbone_depths,
            channels=backbone_channels,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            img_size=img_size,
            spatial_dims=spatial_dims,
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


    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
        return_prefix_tokens: bool = False,
        backbone_indices: int | Sequence[int] | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """`VisionTransformer.forward_intermediates`, optionally preceded by the ResNet's maps.

        A U-shaped decoder (TransUNet) needs the CNN's skip features and the transformer's
        output from one pass of the backbone; `backbone_indices` asks for them.

        Args:
            x: Input `(B, C, *spatial)`.
            indices: Transformer blocks to return (None = all, n = the last n, a list;
                `[]` = none).
            norm: Apply the final norm to each block output.
            output_fmt: `NCHW` or `NLC`, for the block outputs and the ResNet's maps.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested block (only with `intermediates_only`).
            return_prefix_tokens: Return `(map, prefix_tokens)` pairs for the blocks.
            backbone_indices: ResNet features to return first, as
                `ResNetV2.forward_intermediates` numbers them (0 = the stem at stride 2,
                i = stage i); None returns only the blocks'.

        Returns:
            The intermediates (ResNet maps, then block outputs), or `(final_tokens,
            intermediates)` where `final_tokens` is what `forward_features` returns.
        """
        if backbone_indices is None:
            return super().forward_intermediates(
                x, indices, norm, output_fmt, intermediates_only, stop_early, return_prefix_tokens
            )
        check_output_fmt(output_fmt)
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D input (batch, channels and "
                f"{self.spatial_dims} spatial dims), got shape {tuple(x.shape)}"
            )
        grid = self.patch_embed.dynamic_grid(x.shape[2:])
        backbone = self.patch_embed.backbone
        last_map, feats = backbone.forward_intermediates(x, backbone_indices, output_fmt=output_fmt)
        x = self.norm_pre(self._pos_embed(self.patch_embed.project(last_map), grid))
        return self._block_intermediates(
            x, grid, feats, indices, norm, output_fmt, intermediates_only, stop_early, return_prefix_tokens
        )


# -- registered variants ---------------------------------------------------------------
_R50_S16_VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, backbone_depths=(3, 4, 9))


def _create_vit_hybrid(cfg: dict[str, Any], kwargs: dict[str, Any]) -> HybridVisionTransformer:
    """The R50+ViT-B/16 hybrid with the variant's `cfg`, overridden by the caller's `kwargs`."""
    # the image variants are timm's ImageNet configurations; a volume gets its own variant (as the plain ViT)
    if cfg.get("spatial_dims", 2) == 2 and kwargs.get("spatial_dims", 2) != 2:
        raise ValueError(
            "the R50+ViT-B/16 image variants are 2D only; build vit_base_r50_s16_96_3d for volumes"
        )
    return HybridVisionTransformer(**{**_R50_S16_VIT_B, **cfg, **kwargs})


@register_model
def vit_base_r50_s16_224(**kwargs: Any) -> HybridVisionTransformer:
    """R50+ViT-B/16 hybrid at 224 x 224 (Dosovitskiy et al., 2021)."""
    return _create_vit_hybrid(dict(img_size=224), kwargs)


@register_model
def vit_base_r50_s16_384(**kwargs: Any) -> HybridVisionTransformer:
    """R50+ViT-B/16 hybrid at 384 x 384, the paper's fine-tuning resolution (Dosovitskiy et al., 2021)."""
    return _create_vit_hybrid(dict(img_size=384), kwargs)


@register_model
def vit_base_r50_s16_96_3d(**kwargs: Any) -> HybridVisionTransformer:
    """The R50+ViT-B/16 hybrid in 3D: one input channel (CT/MR), 96^3 crops, features only."""
    return _create_vit_hybrid(dict(img_size=96, in_chans=1, num_classes=0, spatial_dims=3), kwargs)
