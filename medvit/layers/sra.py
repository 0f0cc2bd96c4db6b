"""Spatial-reduction attention (SRA) of the Pyramid Vision Transformers.

Queries come from every token; keys and values from a reduced map: a strided
`sr_ratio` convolution + LayerNorm (PVT v1, PVT v2, SegFormer's efficient
self-attention), or, in the linear variant of PVT v2, adaptive average pooling to a
fixed `pool_size` grid + 1x1 convolution + LayerNorm + GELU, whose cost is linear in
the number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.attention_capture import attend
from medvit.layers.helpers import adaptive_avg_pool_nd, check_spatial_dims, conv_nd
from medvit.layers.token_map import map_to_tokens, tokens_to_map


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced token map.

    Drops in as `Block(attn_layer=partial(SpatialReductionAttention, spatial_dims, sr_ratio=...))`. The
    reduction convolves over the token map, so it needs the token grid: `forward` takes it
    from its caller (PVT v2 / MiT, whose blocks run at any input size), or falls back to
    `grid_size` fixed at construction (PVT v1, whose position table fixes the grid).

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        dim: Token width.
        num_heads: Attention heads.
        qkv_bias: Bias of the query and key/value projections.
        qk_norm: Not part of these papers; accepted for `Block`'s calling convention and
            must be False.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Accepted for `Block`'s calling convention; the reduction norm is a
            default `nn.LayerNorm`, as in the papers' code (whose blocks use eps 1e-6).
        grid_size: Default grid of the patch tokens, used when `forward` is given none;
            None: every call passes its grid.
        sr_ratio: Kernel and stride of the reduction convolution; 1: no reduction.
        linear: PVT v2's linear SRA (pooling to `pool_size`, then a 1x1 conv).
        pool_size: Side of the pooled grid of the linear SRA.
        num_prefix_tokens: Leading tokens (class token) kept unreduced in the keys/values.
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        grid_size: Sequence[int] | None = None,
        sr_ratio: int = 1,
        linear: bool = False,
        pool_size: int = 7,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if qk_norm:
            raise ValueError("spatial-reduction attention has no qk_norm option")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be positive, got {sr_ratio}")
        self.spatial_dims = spatial_dims
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.grid_size = None if grid_size is None else check_sra_grid(
            spatial_dims, grid_size, sr_ratio, linear
        )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        conv = conv_nd(spatial_dims)
        self.pool: nn.Module | None = None
        self.sr: nn.Module | None = None
        self.norm: nn.Module | None = None
        self.act: nn.Module | None = None
        if linear:
            self.pool = adaptive_avg_pool_nd(spatial_dims)(pool_size)
            self.sr = conv(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = conv(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _reduce(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        if self.sr is None:
            return x
        if grid is None:
            if self.grid_size is None:
                raise ValueError(
                    "spatial-reduction attention built without grid_size needs the token grid"
                )
            grid = self.grid_size
        else:
            grid = check_sra_grid(self.spatial_dims, grid, self.sr_ratio, self.linear)
        prefix, y = tokens_to_map(x, grid, self.num_prefix_tokens)
        if self.pool is not None:
            y = self.pool(y)
        y = self.norm(map_to_tokens(self.sr(y)))
        if self.act is not None:
            y = self.act(y)
        return torch.cat([prefix, y], dim=1) if prefix.shape[1] else y

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """Attend over `(B, prefix + N, C)` tokens whose patch tokens lie on `grid`.

        Args:
            x: Tokens, prefix (class) tokens first.
            grid: Grid of the patch tokens; None: the `grid_size` given at construction.

        Raises:
            ValueError: No grid is known, or it does not fit the tokens or is smaller than
                the reduction ratio.
        """
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self._reduce(x, grid)).reshape(b, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(
            self, q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
            query_prefix=self.num_prefix_tokens, key_prefix=self.num_prefix_tokens,
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


def check_sra_grid(
    spatial_dims: int, grid: Sequence[int], sr_ratio: int, linear: bool = False
) -> tuple[int, ...]:
    """A token grid that a spatial-reduction attention can reduce, as a tuple.

    Raises:
        ValueError: Wrong number of dims, or (strided reduction) a side below `sr_ratio`.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != spatial_dims:
        raise ValueError(f"grid_size {grid} does not have {spatial_dims} dims")
    # the pooled (linear) form adapts to any grid; the strided conv needs one full window
    if not linear and any(g < sr_ratio for g in grid):
        raise ValueError(
            f"the token grid {grid} is smaller than the reduction ratio {sr_ratio}"
            " (use a larger input)"
        )
    return grid


def stage_mlp_ratios(
    depth: Sequence[int],
    embed_dim: Sequence[int],
    num_heads: Sequence[int],
    sr_ratios: Sequence[int],
    mlp_ratio: float | Sequence[float],
) -> tuple[float, ...]:
    """Check a PVT-style per-stage configuration; the MLP ratio of every stage."""
    n = len(depth)
    if not (len(embed_dim) == len(num_heads) == len(sr_ratios) == n) or n == 0:
        raise ValueError("depth, embed_dim, num_heads and sr_ratios need one entry per stage")
    ratios = (mlp_ratio,) * n if isinstance(mlp_ratio, (int, float)) else tuple(mlp_ratio)
    if len(ratios) != n:
        raise ValueError(f"mlp_ratio needs {n} entries, got {len(ratios)}")
    return ratios
