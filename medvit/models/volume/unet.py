"""A plain convolutional U-Net as nnU-Net configures it, for slices and volumes.

Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015; Isensee et al., "nnU-Net: a self-configuring method for deep learning-based
biomedical image segmentation", Nature Methods 2021.

Each encoder stage is two 3x3(x3) convolution - instance norm - LeakyReLU(0.01) blocks,
the first strided by 2 in every stage but the first (nnU-Net downsamples by strided
convolution, not pooling); the widths double from 32 and are capped at 320 (3D) or 512 (2D).
Each decoder stage upsamples by a transposed convolution (kernel = stride = 2), concatenates
the encoder's skip of that resolution and fuses them with two such blocks; a 1x1 convolution
gives the logits. Differences from nnU-Net's `PlainConvUNet`: the number of stages is
fixed by `features`, not planned from the patch size; the norms have no affine parameters
and the transposed convolutions no bias (the decoders of this library share those blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import ConvBlock, UpBlock
from medvit.layers.conv_blocks import PointwiseConv
from medvit.layers.helpers import check_spatial_dims, to_ntuple
from medvit.models._features import check_stride_multiple
from medvit.models.volume.unetr import deep_supervision_heads, run_decoder
from medvit.registry import register_model


class UNet(nn.Module):
    """Plain convolutional U-Net (nnU-Net's `PlainConvUNet` topology).

    Args:
        in_chans: Input channels (neighbouring slices as channels for 2D slabs).
        num_classes: Output channels (classes, background included).
        img_size: Input (window) size the model is built for; an int is repeated. Every
            side must be a multiple of the total stride `2 ** (len(features) - 1)`;
            `forward` takes any such size (the network is fully convolutional).
        spatial_dims: 2 for slices (nnU-Net's `2d`), 3 for volumes (`3d_fullres`).
        features: Width of each stage, finest first; one stage per entry.
        deep_supervision: Add 1x1 heads on the decoder levels between full resolution and
            the coarsest decoder output (nnU-Net supervises all but that one); in training
            mode `forward` returns `[logits, aux_level1, aux_level2, ...]`, finest first,
            in eval mode only the logits. Needs 4 or more stages.
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 14,
        img_size: int | Sequence[int] = 96,
        spatial_dims: int = 3,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        features = tuple(int(f) for f in features)
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features needs 2 or more positive widths, got {features}")
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.features = features
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.stride = 2 ** (len(features) - 1)
        check_stride_multiple(self.img_size, self.stride, "img_size")
        widths = (in_chans, *features)
        self.encoder = nn.ModuleList(
            ConvBlock(spatial_dims, widths[i], widths[i + 1], residual=False, stride=1 if i == 0 else 2)
            for i in range(len(features))
        )
        # coarsest first, as `run_decoder` takes them
        self.ups = nn.ModuleList(
            UpBlock(spatial_dims, features[i], features[i - 1], residual=False) for i in range(len(features) - 1, 0, -1)
        )
        self.head = PointwiseConv(spatial_dims, features[0], num_classes)
        self.aux_heads = (
            deep_supervision_heads(spatial_dims, features[:-1], num_classes) if deep_supervision else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """`(B, in_chans, *size)` to logits `(B, num_classes, *size)` (see `deep_supervision`).

        Raises:
            ValueError: Wrong channels or dimensions, or a side not a multiple of the stride.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (B, {self.in_chans}, {self.spatial_dims} spatial dims), got {tuple(x.shape)}"
            )
        check_stride_multiple(tuple(x.shape[2:]), self.stride, "input size")
        skips = []
        for stage in self.encoder[:-1]:
            x = stage(x)
            skips.append(x)
        y = self.encoder[-1](x)
        deep = self.aux_heads is not None and self.training
        y, aux = run_decoder(self.ups, y, skips, self.aux_heads if deep else None)
        out = self.head(y).contiguous()
        return [out, *aux] if deep else out


_3D: dict[str, Any] = dict(img_size=96, in_chans=1, num_classes=14, spatial_dims=3)
_2D: dict[str, Any] = dict(img_size=256, in_chans=1, num_classes=14, spatial_dims=2)


@register_model
def unet_nnunet_3d(**kwargs: Any) -> UNet:
    """nnU-Net's 3d_fullres plain U-Net on 96^3 crops: widths 32-64-128-256-320, stride 16 (Isensee et al., 2021)."""
    return UNet(**{**dict(_3D, features=(32, 64, 128, 256, 320)), **kwargs})


@register_model
def unet_nnunet_2d(**kwargs: Any) -> UNet:
    """nnU-Net's 2d plain U-Net on 256^2 slices: widths 32-64-128-256-512-512, stride 32 (Isensee et al., 2021)."""
    return UNet(**{**dict(_2D, features=(32, 64, 128, 256, 512, 512)), **kwargs})
