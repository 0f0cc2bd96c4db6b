"""LayerScale: a learned per-channel scale on each residual branch (Touvron et al., CaiT)."""

from __future__ import annotations

import torch
import torch.nn as nn


class LayerScale(nn.Module):
    """Multiply by a learned diagonal initialised to `init_values`.

    Args:
        dim: Channel width.
        init_values: Initial value of every scale (CaiT uses 1e-5 to 1e-1 by depth).
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
