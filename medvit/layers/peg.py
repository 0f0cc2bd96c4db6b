"""Positional encoding generator, PEG (Chu et al., CPVT, ICLR 2023).

Position information is generated from the tokens themselves: a depthwise convolution
over the token grid, with zero padding so that tokens near the border can tell where
they are, added to its input. It works at any grid size, so a model using it instead of
a position table accepts any input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import conv_nd
from medvit.layers.token_map import map_to_tokens, tokens_to_map


class PEG(nn.Module):
    """x + depthwise-conv(x) on the patch-token grid; prefix tokens pass unchanged.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        dim: Token width.
        kernel_size: Odd kernel extent of the depthwise convolution (3 in the paper).
    """

    def __init__(self, spatial_dims: int, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the PEG kernel size must be odd and positive, got {kernel_size}")
        self.proj = conv_nd(spatial_dims)(
            dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True
        )

    def forward(self, x: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 0) -> torch.Tensor:
        prefix, fmap = tokens_to_map(x, grid, num_prefix_tokens)
        return map_to_tokens(fmap + self.proj(fmap), prefix)
