"""SegFormer: a Mix Transformer encoder and an all-MLP decoder, for slices and volumes.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021.

The encoder is a registered MiT (`medvit/models/image/mit.py`) read through
`forward_intermediates`: its four stage maps (strides 4/8/16/32) feed the all-MLP decoder
(`medvit/layers/mlp_decoder.py`), whose stride-4 logits are upsampled to the input grid.
The 2D variants default to 256x256 single-channel CT slices and 14 classes (BTCV's 13
organs and background); the 3D ones to 96^3 crops, the same defaults as UNETR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.helpers import check_spatial_dims, to_ntuple
from medvit.layers.mlp_decoder import AllMLPDecoder
from medvit.models._features import check_stride_multiple
from medvit.registry import create_model, register_model

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class SegFormer(nn.Module):
    """SegFormer segmentation network.

    Args:
        encoder: Registered MiT (or PVT v2) name, or a built one (then `img_size`,
            `in_chans` and `spatial_dims` must match it).
        in_chans: Input channels (neighbouring slices as channels for 2D slabs).
        num_classes: Output channels (classes, background included).
        img_size: Input (window) size the model is built for; an int is repeated. Every
            side must be a multiple of the encoder's total stride (32). `forward` takes
            other sizes of that kind too: the encoder has no position table.
        spatial_dims: 2 for slices, 3 for volumes.
        decoder_dim: Width of the decoder (paper: 256 for B0/B1, 768 for B2-B5).
        dropout: Channel dropout before the classifier.
        drop_path_rate: Stochastic depth of the encoder (the paper trains with 0.1).
        encoder_args: Extra arguments for the encoder (ignored for a built module).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "mit_b0",
        in_chans: int = 1,
        num_classes: int = 14,
        img_size: int | Sequence[int] = 256,
        spatial_dims: int = 2,
        decoder_dim: int = 256,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        encoder_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.spatial_dims = spatial_dims
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        if isinstance(encoder, str):
            args: dict[str, Any] = dict(num_classes=0, global_pool="", drop_path_rate=drop_path_rate)
            args.update(encoder_args or {})
            args.update(img_size=self.img_size, in_chans=in_chans, spatial_dims=spatial_dims)
            encoder = create_model(encoder, **args)
        for attr in ("stage_channels", "stage_strides", "forward_intermediates"):
            if not hasattr(encoder, attr):
                raise ValueError(f"SegFormer needs a hierarchical encoder with `{attr}`")
        if tuple(encoder.img_size) != self.img_size or encoder.spatial_dims != spatial_dims:
            raise ValueError(
                f"the encoder is built for {tuple(encoder.img_size)} ({encoder.spatial_dims}D),"
                f" not {self.img_size} ({spatial_dims}D)"
            )
        self.encoder = encoder
        self.stride = encoder.stage_strides[-1]
        check_stride_multiple(self.img_size, self.stride, "img_size")
        self.decoder = AllMLPDecoder(spatial_dims, encoder.stage_channels, num_classes, decoder_dim, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, in_chans, *size)` to logits `(B, num_classes, *size)`.

        Raises:
            ValueError: Wrong channels or dimensions, or a side not a multiple of the stride.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (B, {self.in_chans}, {self.spatial_dims} spatial dims), got {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        check_stride_multiple(size, self.stride, "input size")
        # PVT v2 / MiT take their token grids from the input, so any valid size runs
        feats = self.encoder.forward_intermediates(
            x, indices=len(self.encoder.stage_channels), intermediates_only=True
        )
        logits = self.decoder(feats).contiguous()
        return F.interpolate(logits, size=size, mode=_MODES[self.spatial_dims], align_corners=False)


_2D: dict[str, Any] = dict(img_size=256, in_chans=1, num_classes=14, spatial_dims=2)
_3D: dict[str, Any] = dict(img_size=96, in_chans=1, num_classes=14, spatial_dims=3)


@register_model
def segformer_b0(**kwargs: Any) -> SegFormer:
    """SegFormer-B0 on 2D slices: MiT-B0, decoder width 256 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_2D, encoder="mit_b0", decoder_dim=256), **kwargs})


@register_model
def segformer_b1(**kwargs: Any) -> SegFormer:
    """SegFormer-B1 on 2D slices: MiT-B1, decoder width 256 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_2D, encoder="mit_b1", decoder_dim=256), **kwargs})


@register_model
def segformer_b2(**kwargs: Any) -> SegFormer:
    """SegFormer-B2 on 2D slices: MiT-B2, decoder width 768 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_2D, encoder="mit_b2", decoder_dim=768), **kwargs})


@register_model
def segformer_b3(**kwargs: Any) -> SegFormer:
    """SegFormer-B3 on 2D slices: MiT-B3, decoder width 768 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_2D, encoder="mit_b3", decoder_dim=768), **kwargs})


@register_model
def segformer_b4(**kwargs: Any) -> SegFormer:
    """SegFormer-B4 on 2D slices: MiT-B4, decoder width 768 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_2D, encoder="mit_b4", decoder_dim=768), **kwargs})


@register_model
def segformer_b5(**kwargs: Any) -> SegFormer:
    """SegFormer-B5 on 2D slices: MiT-B5, decoder width 768 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_2D, encoder="mit_b5", decoder_dim=768), **kwargs})


@register_model
def segformer3d_b0(**kwargs: Any) -> SegFormer:
    """SegFormer-B0 on volumes: 3D MiT-B0 on 96^3 crops, decoder width 256 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_3D, encoder="mit_b0_3d", decoder_dim=256), **kwargs})


@register_model
def segformer3d_b1(**kwargs: Any) -> SegFormer:
    """SegFormer-B1 on volumes: 3D MiT-B1 on 96^3 crops, decoder width 256 (Xie et al., 2021)."""
    return SegFormer(**{**dict(_3D, encoder="mit_b1_3d", decoder_dim=256), **kwargs})
