"""Small helpers shared by the layers: tuple expansion, conv/pool lookup by dimension."""

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
