"""Transformer feed-forward (MLP) block."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> (norm) -> linear -> dropout.

    Args:
        in_features: Input width.
        hidden_features: Hidden width (defaults to `in_features`).
        out_features: Output width (defaults to `in_features`).
        act_layer: Activation class.
        norm_layer: Optional norm on the hidden features (NormFormer / scaled MLPs).
        bias: Bias of both linears.
        drop: Dropout after the activation and after the output projection.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))
