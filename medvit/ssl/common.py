"""What the self-supervised methods share: MLPs, momentum (EMA) updates, gathering across processes."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: `Linear(bias=False)` + BatchNorm + ReLU between layers; an affine-free
    BatchNorm after the last layer when `last_bn` (SimCLR's design)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = in_dim if i == 0 else hidden_dim
        d2 = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], momentum: float) -> None:
    """`target = momentum * target + (1 - momentum) * source`, tensor by tensor, in place."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for t, s in zip(target, source, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def cosine_momentum(base: float, step: int, total: int) -> float:
    """The momentum at `step` of `total`: from `base` up to 1 on a half cosine (MoCo v3, DINO)."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def world() -> tuple[int, int]:
    """(world size, rank) of the process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def gather_all(x: torch.Tensor) -> torch.Tensor:
    """`x` of every process concatenated along dim 0 (rank order); `x` itself without a group."""
    size, _ = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def mean_all(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over every process (itself without a group)."""
    size, _ = world()
    if size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / size
