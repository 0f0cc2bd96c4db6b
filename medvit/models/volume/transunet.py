"""TransUNet: a CNN-transformer hybrid encoder with a cascaded upsampling decoder.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306, 2021.

Built as the official code (Beckschen/TransUNet) builds it: the R50+ViT-B/16 hybrid
encodes the input; its normed hidden states, reshaped to the stride-16 map, pass a 3x3
conv (768 -> 512) + BN + ReLU (`conv_more`), then four decoder blocks each upsample by 2
(bilinear, corners aligned), concatenate the ResNet feature of that stride (stride 8, 4
and 2: stage 2, stage 1 and the stem before its max pool; the last block has none) and
fuse with two 3x3 conv + BN + ReLU; a 3x3 conv gives the logits. The skips are taken by
their stride from the encoder's `forward_intermediates`, so no layer number is
hard-coded. With `spatial_dims=3` the same network is volumetric (3D ResNet and tokens,
trilinear upsampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers import ConvBlock
from medvit.layers.helpers import batch_norm_nd, check_spatial_dims, conv_nd, to_ntuple
from medvit.registry import create_model, register_model

# the registered R50+ViT-B/16 hybrid of each dimensionality
_DEFAULT_ENCODERS = {2: "vit_base_r50_s16_224", 3: "vit_base_r50_s16_96_3d"}


def _decoder_conv_block(spatial_dims: int, in_chans: int, out_chans: int) -> ConvBlock:
    """Two 3x3 conv + BN + ReLU, the official `DecoderBlock`'s convolutions."""
    return ConvBlock(
        spatial_dims, in_chans, out_chans, norm="batch", residual=False, act_layer=partial(nn.ReLU, inplace=True)
    )


class TransUNet(nn.Module):
    """TransUNet segmentation network (2D or 3D).

    Args:
        encoder: Registered hybrid encoder name, a built one (a `HybridVisionTransformer`),
            or None for the R50+ViT-B/16 hybrid of `spatial_dims`.
        in_chans: Input channels (the stem is built for them; the official code repeats a
            grey channel three times instead).
        num_classes: Output channels (classes, background included).
        img_size: Input size; an int is repeated. Any multiple of the total stride (16)
            is accepted at run time.
        spatial_dims: 2 for slices, 3 for volumes.
        head_channels: Width of `conv_more`, the first decoder convolution.
        decoder_channels: Output width of each decoder block; one block per factor 2 of
            the encoder's patch size.
        n_skip: How many decoder blocks (from the deepest) concatenate the ResNet
            feature of their stride.
        encoder_args: Extra arguments for a named encoder (its depth, widths, drop rates).
    """

    def __init__(
        self,
        encoder: str | nn.Module | None = None,
        in_chans: int = 1,
        num_classes: int = 9,
        img_size: int | Sequence[int] = 224,
        spatial_dims: int = 2,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        n_skip: int = 3,
        encoder_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if check_spatial_dims(spatial_dims) == 1:
            raise ValueError("TransUNet is 2D or 3D, got spatial_dims=1")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        decoder_channels = tuple(decoder_channels)
        if head_channels < 1 or not decoder_channels or min(decoder_channels) < 1:
            raise ValueError(
                f"head_channels ({head_channels}) and decoder_channels {decoder_channels} must be positive"
            )
        self.spatial_dims = spatial_dims
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        if encoder is None or isinstance(encoder, str):
            # any multiple of the stride is accepted, so the position table resamples on the fly
            args: dict[str, Any] = dict(
                class_token=False, global_pool="", num_classes=0, dynamic_img_size=True
            )
            args.update(encoder_args or {})
            args.update(img_size=self.img_size, in_chans=in_chans, spatial_dims=spatial_dims)
            encoder = create_model(encoder or _DEFAULT_ENCODERS[spatial_dims], **args)
        if getattr(encoder, "spatial_dims", None) != spatial_dims or encoder.in_chans != in_chans:
            raise ValueError(
                f"the encoder is {encoder.spatial_dims}D with {encoder.in_chans} input channels, "
                f"the model {spatial_dims}D with {in_chans}"
            )
        backbone = getattr(getattr(encoder, "patch_embed", None), "backbone", None)
        if backbone is None or not hasattr(backbone, "feature_reductions"):
            raise ValueError(
                "TransUNet needs a hybrid encoder (a ViT over a ResNetV2, `patch_embed.backbone`)"
            )
        self.encoder = encoder

        patch = set(encoder.patch_size)
        num_up = len(decoder_channels)
        if patch != {2**num_up}:
            raise ValueError(
                f"{num_up} decoder blocks upsample by {2**num_up}, but the encoder's patch size is "
                f"{encoder.patch_size}; give one decoder channel per factor 2 of an isotropic patch"
            )
        self.total_stride = 2**num_up
        if not 0 <= n_skip < num_up:
            raise ValueError(f"n_skip must be in [0, {num_up - 1}], got {n_skip}")
        skip_strides = [self.total_stride // 2 ** (i + 1) for i in range(n_skip)]
        missing = [s for s in skip_strides if s not in backbone.feature_reductions]
        if missing:
            raise ValueError(
                f"n_skip={n_skip} needs encoder features at strides {skip_strides}; the ResNet has "
                f"{backbone.feature_reductions}"
            )
        # deepest first, as the decoder consumes them
        self.skip_indices = tuple(backbone.feature_reductions.index(s) for s in skip_strides)
        skip_chans = [backbone.feature_channels[i] for i in self.skip_indices] + [0] * (num_up - n_skip)

        conv, norm = conv_nd(spatial_dims), batch_norm_nd(spatial_dims)
        self.conv_more = nn.Sequential(
            conv(encoder.num_features, head_channels, 3, padding=1, bias=False),
            norm(head_channels),
            nn.ReLU(inplace=True),
        )
        ins = (head_channels, *decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            _decoder_conv_block(spatial_dims, i + s, o) for i, s, o in zip(ins, skip_chans, decoder_channels)
        )
        self.head = conv(decoder_channels[-1], num_classes, 3, padding=1)
        self.upsample_mode = "bilinear" if spatial_dims == 2 else "trilinear"
        # oneDNN's channels-last convolutions are ~2x faster on CPUs; the decoder runs in it
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        for part in (self.conv_more, self.blocks, self.head):
            part.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D input (batch, channels and {self.spatial_dims} "
                f"spatial dims), got shape {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        if any(s % self.total_stride for s in size):
            raise ValueError(
                f"input size {size} must be a multiple of TransUNet's total stride {self.total_stride}"
            )
        # ascending, the order in which the ResNet produces them
        order = sorted(self.skip_indices)
        hidden, feats = self.encoder.forward_intermediates(x, indices=[], backbone_indices=order)
        skips = [feats[order.index(i)] for i in self.skip_indices]

        fmt = self.memory_format
        grid = tuple(s // self.total_stride for s in size)
        tokens = hidden[:, getattr(self.encoder, "num_prefix_tokens", 0) :]
        y = tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid).contiguous(memory_format=fmt)
        y = self.conv_more(y)
        for i, block in enumerate(self.blocks):
            y = F.interpolate(y, scale_factor=2, mode=self.upsample_mode, align_corners=True)
            if i < len(skips):
                y = torch.cat([y, skips[i].contiguous(memory_format=fmt)], dim=1)
            y = block(y)
        return self.head(y).contiguous()


# The official transformer's dropout (0.1 after the position embedding and in the MLP).
# Our Block has one projection dropout for the MLP and the attention output, so the latter
# (0 in the official code) drops too.
_ENCODER_DROPOUT = dict(pos_drop_rate=0.1, proj_drop_rate=0.1)


def _create_transunet(cfg: dict[str, Any], kwargs: dict[str, Any]) -> TransUNet:
    """The variant's `cfg` under the caller's `kwargs`; the encoder's dropout is the official one."""
    args = {**cfg, **kwargs}
    args["encoder_args"] = {**_ENCODER_DROPOUT, **(kwargs.get("encoder_args") or {})}
    return TransUNet(**args)


@register_model
def transunet_r50_vit_b16(**kwargs: Any) -> TransUNet:
    """The paper's TransUNet: R50+ViT-B/16 (12 layers), n_skip 3, 224 x 224 CT slices, Synapse's 9 classes."""
    return _create_transunet(dict(spatial_dims=2, img_size=224, in_chans=1, num_classes=9), kwargs)


@register_model
def transunet3d_r50_vit_b16(**kwargs: Any) -> TransUNet:
    """TransUNet in 3D: the same network with 3D kernels on 96^3 crops, 14 classes (BTCV)."""
    return _create_transunet(dict(spatial_dims=3, img_size=96, in_chans=1, num_classes=14), kwargs)
