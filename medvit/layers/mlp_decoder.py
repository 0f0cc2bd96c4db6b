"""SegFormer's all-MLP decoder for multi-scale encoders (Xie et al., NeurIPS 2021).

Each scale is projected to a common width by a linear layer, upsampled to the finest
scale (bilinear/trilinear, `align_corners=False`), the maps are concatenated deepest
first, fused by a 1x1 conv + BatchNorm + ReLU, and a 1x1 classifier follows dropout.

Projection, upsampling and the fusing 1x1 conv are all linear and the interpolation
weights sum to one, so `fuse(cat_i(up(proj_i(f_i))))` equals `sum_i up(fuse_i(proj_i(f_i)))`
with `fuse_i` the fuse weight's block for scale i. The decoder computes the second form:
every scale is projected straight to the fused width at its own resolution, which skips
the `4 * decoder_dim`-wide concatenation and its `4 D x D` matmul at the finest scale (the
dominant cost of the decoder on CPUs) while keeping the paper's parameters and function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.helpers import check_spatial_dims

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class AllMLPDecoder(nn.Module):
    """Linear projections, upsampling to the finest scale, fuse, classify.

    Parameters follow the official code: `linear_c[i]` projects scale i (shallow to deep)
    to `decoder_dim`; `linear_fuse` is the bias-free 1x1 conv over the concatenation in
    deepest-first order, stored as a `(decoder_dim, n * decoder_dim)` matrix (a conv
    checkpoint's weight is its view); `norm` its BatchNorm; `linear_pred` the classifier.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: Channels of each input scale, finest first.
        num_classes: Output channels.
        decoder_dim: Common width of the projections and of the fused map.
        dropout: Channel dropout before the classifier (the official `Dropout2d`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        num_classes: int,
        decoder_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if len(in_channels) == 0:
            raise ValueError("the decoder needs at least one input scale")
        if num_classes < 1 or decoder_dim < 1:
            raise ValueError(f"num_classes and decoder_dim must be >= 1, got {num_classes}, {decoder_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = tuple(in_channels)
        self.decoder_dim = decoder_dim
        self.linear_c = nn.ModuleList(nn.Linear(c, decoder_dim) for c in self.in_channels)
        self.linear_fuse = nn.Linear(len(self.in_channels) * decoder_dim, decoder_dim, bias=False)
        # BatchNorm1d over (voxels, channels) has the statistics of BatchNorm2d/3d over the map
        self.norm = nn.BatchNorm1d(decoder_dim)
        self.act = nn.ReLU(inplace=True)
        # Dropout1d on (B, C, N) zeroes whole channels per sample, as Dropout2d/3d do on maps
        self.drop = nn.Dropout1d(dropout)
        self.linear_pred = nn.Linear(decoder_dim, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Channels-first maps, finest first, to logits at the finest scale (channels-last memory).

        Raises:
            ValueError: The number of maps or their widths do not match `in_channels`.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(features)}")
        size = features[0].shape[2:]
        n, d = len(features), self.decoder_dim
        # the concatenation is deepest first: scale i owns column block n - 1 - i of the fuse
        blocks = self.linear_fuse.weight.view(d, n, d).unbind(1)[::-1]
        bias = sum(blk @ proj.bias for blk, proj in zip(blocks, self.linear_c))
        maps = []
        for i, (f, proj, blk) in enumerate(zip(features, self.linear_c, blocks)):
            if f.shape[1] != self.in_channels[i]:
                raise ValueError(f"feature map {i} has {f.shape[1]} channels, expected {self.in_channels[i]}")
            # channels-last: the projection is a matmul over the contiguous channel axis
            y = F.linear(f.movedim(1, -1), blk @ proj.weight, bias if i == 0 else None).movedim(-1, 1)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode=_MODES[self.spatial_dims], align_corners=False)
            maps.append(y)
        out = sum(maps[1:], maps[0])
        b = out.shape[0]
        tokens = out.movedim(1, -1).reshape(-1, d)
        tokens = self.act(self.norm(tokens)).view(b, -1, d)
        tokens = self.drop(tokens.transpose(1, 2)).transpose(1, 2)
        logits = self.linear_pred(tokens)
        return logits.view(b, *size, -1).movedim(-1, 1)
