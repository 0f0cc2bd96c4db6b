"""Building blocks: each is defined once here and reused by every model."""

from __future__ import annotations

from medvit.layers.attention import Attention
from medvit.layers.block import Block
from medvit.layers.conv_blocks import ConvBlock, ProjectionUpsample, UpBlock, upsample_conv
from medvit.layers.drop import DropPath, drop_path_schedule
from medvit.layers.layer_scale import LayerScale
from medvit.layers.mlp import Mlp
from medvit.layers.patch_embed import PatchEmbed, grid_for
from medvit.layers.pooling import AttentionPoolLatent, check_pool_type, pool_tokens
from medvit.layers.pos_embed import resample_pos_embed, sincos_pos_embed

__all__ = [
    "Attention",
    "AttentionPoolLatent",
    "Block",
    "ConvBlock",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "ProjectionUpsample",
    "UpBlock",
    "check_pool_type",
    "drop_path_schedule",
    "grid_for",
    "pool_tokens",
    "resample_pos_embed",
    "sincos_pos_embed",
    "upsample_conv",
]
