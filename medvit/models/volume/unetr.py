"""UNETR: a transformer encoder with a convolutional U-shaped decoder.

Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022.

The encoder comes from the registry and is read through `forward_intermediates`, so any
encoder with single-scale token maps plugs into the same decoder. Layer indices are
0-based block indices as MONAI's UNETR uses them (its skips are the outputs of blocks
3, 6 and 9 and the normed output of the last block), so MONAI checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import ConvBlock, ProjectionUpsample, UpBlock
from medvit.layers.conv_blocks import PointwiseConv
from medvit.layers.helpers import check_spatial_dims, to_ntuple
from medvit.registry import create_model, register_model


class UNETR(nn.Module):
    """UNETR segmentation network.

    Args:
        encoder: Registered encoder name, or a built encoder module.
        in_chans: Input channels.
        num_classes: Output channels (classes, background included).
        img_size: Input (window) size; an int is repeated.
        feature_size: Width of the full-resolution decoder stage (doubles per stage).
        spatial_dims: 3 for volumes, 2 for slices.
        skip_indices: Encoder blocks whose outputs feed the skips, shallow to deep; one per
            decoder stage between the stem and the bottleneck (log2(patch) - 1 of them).
        norm: Decoder norm, `instance` or `batch`.
        res_block: Residual decoder conv blocks.
        conv_block: Conv blocks in the skip upsampling paths.
        encoder_args: Extra arguments for the encoder (ignored for a built module).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "vit_base_patch16_96_3d",
        in_chans: int = 1,
        num_classes: int = 14,
        img_size: int | Sequence[int] = 96,
        feature_size: int = 16,
        spatial_dims: int = 3,
        skip_indices: Sequence[int] = (3, 6, 9),
        norm: str = "instance",
        res_block: bool = True,
        conv_block: bool = True,
        encoder_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        self.spatial_dims = spatial_dims
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        if isinstance(encoder, str):
            args = dict(class_token=False, global_pool="", num_classes=0)
            args.update(encoder_args or {})
            args.update(img_size=self.img_size, in_chans=in_chans, spatial_dims=spatial_dims)
            encoder = create_model(encoder, **args)
        self.encoder = encoder
        patch = set(getattr(encoder, "patch_size", ()))
        if len(patch) != 1 or not math.log2(next(iter(patch))).is_integer():
            raise ValueError(f"UNETR needs an isotropic power-of-two patch size, got {encoder.patch_size}")
        num_up = int(math.log2(next(iter(patch))))
        self.skip_indices = tuple(skip_indices)
        if len(self.skip_indices) != num_up - 1:
            raise ValueError(
                f"patch size {next(iter(patch))} needs {num_up - 1} skip indices, got {self.skip_indices}"
            )
        hidden = encoder.num_features
        widths = [feature_size * 2**i for i in range(num_up)]
        kw = dict(spatial_dims=spatial_dims, norm=norm, residual=res_block)
        self.stem = ConvBlock(in_chans, feature_size, **kw)
        self.skips = nn.ModuleList(
            ProjectionUpsample(hidden, widths[i], num_up - i, conv_block=conv_block, **kw)
            for i in range(1, num_up)
        )
        self.ups = nn.ModuleList(
            UpBlock(hidden if i == num_up - 1 else widths[i + 1], widths[i], **kw)
            for i in reversed(range(num_up))
        )
        self.head = PointwiseConv(feature_size, num_classes, spatial_dims)
        # oneDNN's channels-last convolutions are ~2x faster on CPUs; the decoder runs in it
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        if spatial_dims > 1:
            for part in (self.stem, self.skips, self.ups):
                part.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, feats = self.encoder.forward_intermediates(x, self.skip_indices, output_fmt="NLC")
        grid = self.encoder.grid_size if x.shape[2:] == self.img_size else None
        if grid is None:
            grid = self.encoder.patch_embed.dynamic_grid(x.shape[2:])

        fmt = self.memory_format if self.spatial_dims > 1 else torch.contiguous_format

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid).contiguous(memory_format=fmt)

        prefix = getattr(self.encoder, "num_prefix_tokens", 0)
        stem = self.stem(x.contiguous(memory_format=fmt))
        skips = [stem] + [path(to_map(f)) for path, f in zip(self.skips, feats)]
        y = to_map(final[:, prefix:])
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip)
        return self.head(y).contiguous()


def _unetr_variant(encoder: str, feature_size: int, kwargs: dict[str, Any]) -> UNETR:
    args: dict[str, Any] = dict(encoder=encoder, feature_size=feature_size, skip_indices=(3, 6, 9))
    args.update(kwargs)
    # MONAI's UNETR encoder: no q/k/v bias, LayerNorm eps 1e-5 (so its checkpoints load)
    args["encoder_args"] = {"qkv_bias": False, "norm_eps": 1e-5, **(kwargs.get("encoder_args") or {})}
    return UNETR(**args)


_TINY_UNETR = dict(
    img_size=32, feature_size=4, skip_indices=(0, 1, 2), encoder_args=dict(embed_dim=32, depth=3, num_heads=2)
)


@register_model(tiny=_TINY_UNETR)
def unetr_base(**kwargs: Any) -> UNETR:
    """The paper's UNETR: ViT-B/16 on 96^3 crops, feature size 16, skips from blocks 3/6/9."""
    return _unetr_variant("vit_base_patch16_96_3d", 16, kwargs)


@register_model(tiny=_TINY_UNETR)
def unetr_small(**kwargs: Any) -> UNETR:
    """UNETR on ViT-S/16 (384 wide, 12 blocks, 6 heads), feature size 16."""
    return _unetr_variant("vit_small_patch16_96_3d", 16, kwargs)


@register_model(tiny=_TINY_UNETR)
def unetr_tiny(**kwargs: Any) -> UNETR:
    """UNETR on ViT-Ti/16 (192 wide, 12 blocks, 3 heads), feature size 16: trains on a CPU."""
    return _unetr_variant("vit_tiny_patch16_96_3d", 16, kwargs)
