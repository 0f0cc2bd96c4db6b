"""Small helpers shared by the layers: tuple expansion, layer lookup by dimension.

`spatial_dims` (1, 2 or 3: the number of grid axes) is passed by one rule everywhere,
as in MONAI's blocks (`UnetrBasicBlock(spatial_dims, in_channels, ...)`):

- Building blocks (the layers of `medvit.layers` and the private stages, blocks and
  block builders of the model files) take `spatial_dims` as their first parameter,
  required, with no default: `ConvBlock(spatial_dims, in_chans, out_chans)`. A block
  given to `Block` as `attn_layer` / `mlp_layer` is bound positionally:
  `partial(SpatialReductionAttention, spatial_dims, sr_ratio=...)`.
- Factories keyed on the dimension take it first as well: `conv_nd(spatial_dims)`.
- Model classes (the families `create_model` builds) take `spatial_dims` as a keyword
  argument whose default is the paper's dimensionality: 2 for image backbones and 2D
  segmenters, 3 for the volumetric segmenters (UNETR, Swin-UNETR); video models fix it.
  Their shared bases and builders take it keyword-only, without a default.
- The name is always `spatial_dims`. A layer whose dimensionality follows from a size it
  is given (a window or grid tuple) takes no separate `spatial_dims`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn


def to_ntuple(value: int | Sequence[int], n: int, name: str = "value") -> tuple[int, ...]:
    """Expand an int to an n-tuple, or check a sequence has length n."""
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {tuple(value)}")
    return out


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return spatial_dims


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[check_spatial_dims(spatial_dims)]


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[
        check_spatial_dims(spatial_dims)
    ]


def instance_norm_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[
        check_spatial_dims(spatial_dims)
    ]


def batch_norm_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[check_spatial_dims(spatial_dims)]


def adaptive_avg_pool_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[
        check_spatial_dims(spatial_dims)
    ]
