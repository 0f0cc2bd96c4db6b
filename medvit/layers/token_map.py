"""Token sequences to channels-first maps and back, for layers that convolve over the grid.

Patch tokens are stored row-major (the order `PatchEmbed` flattens them in), so a
`(B, N, C)` sequence after the prefix (class, distillation) tokens is a `(B, C, *grid)`
map without any copy of data other than the transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def tokens_to_map(
    x: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `(B, prefix + N, C)` into the prefix tokens and a `(B, C, *grid)` map.

    Raises:
        ValueError: The number of patch tokens is not the size of `grid`.
    """
    b, n, c = x.shape
    if n - num_prefix_tokens != math.prod(grid):
        raise ValueError(
            f"{n} tokens do not fit {num_prefix_tokens} prefix tokens and a grid of {tuple(grid)}"
        )
    prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    return prefix, tokens.transpose(1, 2).reshape(b, c, *grid)


def map_to_tokens(x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Flatten a `(B, C, *grid)` map to `(B, N, C)` tokens, after `prefix` when given."""
    tokens = x.flatten(2).transpose(1, 2)
    if prefix is None or prefix.shape[1] == 0:
        return tokens
    return torch.cat([prefix, tokens], dim=1)


def format_tokens(
    x: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int, output_fmt: str
) -> torch.Tensor:
    """Patch tokens of an intermediate as a map (`NCHW`) or a sequence (`NLC`), prefix removed."""
    if output_fmt == "NCHW":
        return tokens_to_map(x, grid, num_prefix_tokens)[1]
    return x[:, num_prefix_tokens:]
