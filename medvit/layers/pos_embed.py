"""Absolute position embeddings: fixed n-D sin-cos tables and resampling to a new grid.

Resampling a learned table to another token grid is how the ViT paper (Dosovitskiy et
al., 2021) fine-tunes at a new resolution; the same is used to load a checkpoint trained
at one input size into a model built for another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sincos_pos_embed(grid_size: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos embedding of an n-D grid, `(prod(grid_size), dim)`.

    Each axis gets `dim // (2 * n)` frequencies (sin and cos); any remainder of the
    width is zero so that every `dim` is accepted.
    """
    n = len(grid_size)
    per_axis = dim // (2 * n)
    if per_axis < 1:
        raise ValueError(f"width {dim} is too small for a {n}-D sin-cos position embedding")
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float64) / per_axis)
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in grid_size], indexing="ij")
    parts = []
    for coord in axes:
        angles = coord.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Sequence[int],
    num_prefix_tokens: int = 0,
    mode: str | None = None,
) -> torch.Tensor:
    """Interpolate a `(1, prefix + prod(old_grid), D)` table to `new_grid`.

    Prefix (class, distillation) tokens are kept as they are. 2D grids use bicubic
    interpolation with antialiasing (as timm does, so converted checkpoints agree);
    3D grids use trilinear, 1D linear.
    """
    new_grid, old_grid = tuple(int(g) for g in new_grid), tuple(int(g) for g in old_grid)
    n_old = 1
    for g in old_grid:
        n_old *= g
    if pos_embed.shape[1] != num_prefix_tokens + n_old:
        raise ValueError(
            f"position embedding has {pos_embed.shape[1]} tokens, expected "
            f"{num_prefix_tokens} prefix + {n_old} for grid {old_grid}"
        )
    if new_grid == old_grid:
        return pos_embed
    if len(new_grid) != len(old_grid):
        raise ValueError(f"cannot resample a {len(old_grid)}-D grid to {len(new_grid)}-D")
    nd = len(old_grid)
    mode = mode or {1: "linear", 2: "bicubic", 3: "trilinear"}[nd]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, *old_grid, dim).movedim(-1, 1)
    grid = F.interpolate(
        grid, size=new_grid, mode=mode, align_corners=False, antialias=(mode in ("bicubic", "bilinear"))
    )
    grid = grid.movedim(1, -1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)
