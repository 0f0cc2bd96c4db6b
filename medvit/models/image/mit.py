"""Mix Transformer, the SegFormer encoder (Xie et al., "SegFormer: Simple and Efficient
Design for Semantic Segmentation with Transformers", NeurIPS 2021).

Overlapping patch merging (7/4, then 3/2), efficient self-attention with a per-stage
reduction ratio, and the Mix-FFN (a 3x3 depthwise conv in the feed-forward) instead of
a position embedding. That is PVT v2 without its linear SRA and with a 4x feed-forward in
every stage, so the model is `PyramidVisionTransformerV2` with those defaults (and the
same parameter names). 2D and 3D (`*_3d`, `spatial_dims=3`) variants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medvit.models.image.pvt_v2 import PyramidVisionTransformerV2
from medvit.registry import register_model


class MixVisionTransformer(PyramidVisionTransformerV2):
    """SegFormer's MiT encoder: PVT v2 with `mlp_ratio=4` in every stage and no linear SRA.

    Args:
        mlp_ratio: Mix-FFN expansion (a number applies to all stages).
        **kwargs: `PyramidVisionTransformerV2` arguments (`img_size`, `depth`, `embed_dim`,
            `num_heads`, `sr_ratios`, `num_classes`, `spatial_dims`, ...).
    """

    def __init__(self, mlp_ratio: float | Sequence[float] = 4.0, **kwargs: Any) -> None:
        if kwargs.get("linear"):
            raise ValueError("the Mix Transformer has no linear SRA (use pvt_v2_b2_li)")
        super().__init__(mlp_ratio=mlp_ratio, **kwargs)


_NARROW = dict(embed_dim=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))
_WIDE = dict(embed_dim=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
_3D = dict(img_size=(96, 96, 96), in_chans=1, spatial_dims=3)


@register_model
def mit_b0(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B0: widths 32/64/160/256, depths 2/2/2/2 (Xie et al., 2021)."""
    return MixVisionTransformer(**{**dict(depth=(2, 2, 2, 2), **_NARROW), **kwargs})


@register_model
def mit_b1(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B1: widths 64/128/320/512, depths 2/2/2/2 (Xie et al., 2021)."""
    return MixVisionTransformer(**{**dict(depth=(2, 2, 2, 2), **_WIDE), **kwargs})


@register_model
def mit_b2(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B2: widths 64/128/320/512, depths 3/4/6/3 (Xie et al., 2021)."""
    return MixVisionTransformer(**{**dict(depth=(3, 4, 6, 3), **_WIDE), **kwargs})


@register_model
def mit_b3(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B3: widths 64/128/320/512, depths 3/4/18/3 (Xie et al., 2021)."""
    return MixVisionTransformer(**{**dict(depth=(3, 4, 18, 3), **_WIDE), **kwargs})


@register_model
def mit_b4(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B4: widths 64/128/320/512, depths 3/8/27/3 (Xie et al., 2021)."""
    return MixVisionTransformer(**{**dict(depth=(3, 8, 27, 3), **_WIDE), **kwargs})


@register_model
def mit_b5(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B5: widths 64/128/320/512, depths 3/6/40/3 (Xie et al., 2021)."""
    return MixVisionTransformer(**{**dict(depth=(3, 6, 40, 3), **_WIDE), **kwargs})


@register_model
def mit_b0_3d(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B0 in 3D: one input channel (CT/MR), 96^3 crops."""
    return MixVisionTransformer(**{**dict(depth=(2, 2, 2, 2), **_NARROW, **_3D), **kwargs})


@register_model
def mit_b1_3d(**kwargs: Any) -> MixVisionTransformer:
    """MiT-B1 in 3D: one input channel (CT/MR), 96^3 crops."""
    return MixVisionTransformer(**{**dict(depth=(2, 2, 2, 2), **_WIDE, **_3D), **kwargs})
