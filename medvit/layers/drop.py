"""Stochastic depth (DropPath) and its linear depth schedule (Huang et al., 2016)."""

from __future__ import annotations

import torch
import torch.nn as nn


def drop_path_schedule(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block drop probabilities rising linearly from 0 to `drop_path_rate`."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if depth <= 0:
        return []
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


class DropPath(nn.Module):
    """Drops the whole residual branch per sample, rescaling the kept ones by 1 / keep.

    Args:
        drop_prob: Probability of dropping a sample's branch during training.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
