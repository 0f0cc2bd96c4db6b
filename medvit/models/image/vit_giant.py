"""ViT-g/14, the giant configuration with the MAP head.

Zhai et al., "Scaling Vision Transformers", CVPR 2022: ViT-g/14 has width 1408, depth
40, MLP width 6144 and 16 heads, and replaces the class token by multi-head attention
pooling (MAP) over the patch tokens. It is a plain `VisionTransformer` configuration.
"""

from __future__ import annotations

from typing import Any

from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model

# 6144 / 1408 = 48 / 11 exactly, so int(1408 * mlp_ratio) is the paper's 6144
_VIT_G14 = dict(
    img_size=224,
    patch_size=14,
    embed_dim=1408,
    depth=40,
    num_heads=16,
    mlp_ratio=48 / 11,
    global_pool="map",
    class_token=False,
)


@register_model
def vit_giant_patch14_224(**kwargs: Any) -> VisionTransformer:
    """ViT-g/14 at 224 x 224 with the MAP head and no class token (Zhai et al., 2022)."""
    return VisionTransformer(**{**_VIT_G14, **kwargs})
