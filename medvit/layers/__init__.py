"""Building blocks: each is defined once here and reused by every model."""

from __future__ import annotations

from medvit.layers.attention import Attention
from medvit.layers.attention_variants import XCA, TalkingHeadAttn
from medvit.layers.block import Block
from medvit.layers.bottleneck import Bottleneck
from medvit.layers.class_attention import ClassAttentionBlock, ClassAttn
from medvit.layers.conv_blocks import ConvBlock, PointwiseConv, ProjectionUpsample, UpBlock, upsample_conv
from medvit.layers.conv_ffn import ConvFeedForward
from medvit.layers.cov_pool import CovariancePool
from medvit.layers.cross_attention import CrossAttentionBlock
from medvit.layers.drop import DropPath, drop_path_schedule
from medvit.layers.gpsa import GPSA
from medvit.layers.hybrid_embed import HybridEmbed
from medvit.layers.layer_scale import LayerScale
from medvit.layers.mlp import Mlp
from medvit.layers.patch_embed import PatchEmbed, grid_for
from medvit.layers.peg import PEG
from medvit.layers.pooling import AttentionPoolLatent, check_pool_type, pool_tokens
from medvit.layers.pos_embed import resample_pos_embed, sincos_pos_embed
from medvit.layers.reattention import ReAttention
from medvit.layers.squeeze_excite import SqueezeExcite
from medvit.layers.std_conv import MaxPool2dSame, StdConv2d

__all__ = [
    "GPSA",
    "PEG",
    "XCA",
    "Attention",
    "AttentionPoolLatent",
    "Block",
    "Bottleneck",
    "ClassAttentionBlock",
    "ClassAttn",
    "ConvBlock",
    "ConvFeedForward",
    "CovariancePool",
    "CrossAttentionBlock",
    "DropPath",
    "HybridEmbed",
    "LayerScale",
    "MaxPool2dSame",
    "Mlp",
    "PatchEmbed",
    "PointwiseConv",
    "ProjectionUpsample",
    "ReAttention",
    "SqueezeExcite",
    "StdConv2d",
    "TalkingHeadAttn",
    "UpBlock",
    "check_pool_type",
    "drop_path_schedule",
    "grid_for",
    "pool_tokens",
    "resample_pos_embed",
    "sincos_pos_embed",
    "upsample_conv",
]
