"""HaloNet: ResNet-shaped backbones built from blocked local self-attention.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
CVPR 2021. Every bottleneck's 3x3 convolution (all four stages, the convolutional stem
kept) is halo attention: `b x b` query blocks attending to their block plus an `h`-pixel
halo, with relative position logits; the first block of a stage downsamples with strided
queries. Models H0-H7 scale the block size, halo, value multiplier `rv`, bottleneck
multiplier `rb`, the third-stage depth `l3` and the resolution.

Built on `AttnResNet` (see `medvit.models.image.botnet`); the attention layers mirror
timm's `HaloAttn`, so timm attention weights load into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch.nn as nn

from medvit.layers.halo_attention import HaloAttention
from medvit.models.image.botnet import AttnResNet
from medvit.registry import register_model


def _halo(
    in_chs: int,
    out_chs: int,
    stride: int,
    feat_size: tuple[int, int],
    num_heads: int,
    block_size: int,
    halo_size: int,
    qkv_bias: bool,
) -> nn.Module:
    return HaloAttention(
        in_chs, out_chs, stride, num_heads, block_size=block_size, halo_size=halo_size, qkv_bias=qkv_bias
    )


class HaloNet(AttnResNet):
    """A ResNet whose every bottleneck uses halo attention.

    Args:
        depths: Blocks per stage (`l3` is the third).
        widths: Bottleneck (attention) widths per stage.
        block_size: Query block size `b`.
        halo_size: Halo `h`.
        num_heads: Attention heads.
        output_ratio: Stage output width relative to the bottleneck width (`rb`).
        value_ratio: Attention output (value) width relative to the bottleneck width (`rv`).
        qkv_bias: Bias on the attention projections.
        **kwargs: `AttnResNet` arguments (`img_size`, `num_classes`, `head_hidden_size`, ...).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 10, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        block_size: int = 8,
        halo_size: int = 3,
        num_heads: int = 8,
        output_ratio: float = 1.0,
        value_ratio: float = 1.0,
        qkv_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"block_size must be >= 1 and halo_size >= 0, got {block_size}, {halo_size}")
        if output_ratio <= 0 or value_ratio <= 0:
            raise ValueError(f"output_ratio and value_ratio must be > 0, got {output_ratio}, {value_ratio}")
        channels = [int(round(w * output_ratio)) for w in widths]
        halo = partial(_halo, num_heads=num_heads, block_size=block_size, halo_size=halo_size, qkv_bias=qkv_bias)
        # the last stage's output map must still hold whole blocks
        kwargs.setdefault("size_multiple", 32 * block_size)
        super().__init__(
            depths, channels, (halo,) * 4, bottle_ratio=1 / output_ratio, value_ratio=value_ratio, **kwargs
        )


# Paper Table 2 (b, h, rv, rb, l3, size): H0 (8, 3, 1.0, 0.5, 7, 256) 5.5M, H1 (8, 3, 1.0, 1.0, 10, 256)
# 8.1M, H2 (8, 3, 1.0, 1.25, 11, 256) 9.4M; 8 heads, bottleneck widths 64-512 (reproduces those counts)
@register_model
def halonet_h0(**kwargs: Any) -> HaloNet:
    """HaloNet-H0: blocks 8, halo 3, bottleneck ratio 0.5, 7 c4 layers, 256 px (Vaswani et al., 2021)."""
    return HaloNet(**{**dict(depths=(3, 3, 7, 3), output_ratio=0.5, img_size=256), **kwargs})


@register_model
def halonet_h1(**kwargs: Any) -> HaloNet:
    """HaloNet-H1: blocks 8, halo 3, bottleneck ratio 1.0, 10 c4 layers, 256 px (Vaswani et al., 2021)."""
    return HaloNet(**{**dict(depths=(3, 3, 10, 3), output_ratio=1.0, img_size=256), **kwargs})


@register_model
def halonet_h2(**kwargs: Any) -> HaloNet:
    """HaloNet-H2: blocks 8, halo 3, bottleneck ratio 1.25, 11 c4 layers, 256 px (Vaswani et al., 2021)."""
    return HaloNet(**{**dict(depths=(3, 3, 11, 3), output_ratio=1.25, img_size=256), **kwargs})
