"""Attention with a learned per-head bias on relative offsets instead of a position embedding.

Graham et al. (LeViT, 2021): each head adds a bias indexed by the absolute offset
`(|dy|, |dx|)` between query and key on the token grid, so position enters every block.
`AttentionSubsample` queries a strided subset of the grid: it shrinks the token map
between stages (and widens it) the way a strided convolution does.
Projections are `LinearNorm` (linear + BatchNorm) and the output goes through an
activation before its projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.attention_capture import record_attention
from medvit.layers.linear_norm import LinearNorm


def _grid_positions(resolution: Sequence[int], stride: int = 1) -> torch.Tensor:
    """`(2, N)` row/column coordinates of a (strided) grid, in row-major order."""
    rows = torch.arange(0, resolution[0], stride)
    cols = torch.arange(0, resolution[1], stride)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)


def _bias_index(resolution: Sequence[int], stride: int = 1) -> torch.Tensor:
    """`(Nq, Nk)` index of each query/key offset into a table of `H * W` entries."""
    q, k = _grid_positions(resolution, stride), _grid_positions(resolution)
    rel = (q[:, :, None] - k[:, None, :]).abs()
    return rel[0] * resolution[1] + rel[1]


class _BiasTable(nn.Module):
    """Shared part: the `(heads, H * W)` table and its `(Nq, Nk)` index buffer."""

    attention_biases: nn.Parameter

    def _init_bias(self, num_heads: int, resolution: tuple[int, int], stride: int = 1) -> None:
        self.resolution = resolution
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        # derived from the grid alone: rebuilt at construction, never stored in checkpoints
        self.register_buffer("attention_bias_idxs", _bias_index(resolution, stride), persistent=False)

    def bias(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]


class AttentionBias(_BiasTable):
    """Self-attention over an `H x W` token grid with a relative-offset bias.

    Args:
        dim: Token width.
        key_dim: Width of each head's queries and keys.
        num_heads: Heads.
        attn_ratio: Value width per head relative to `key_dim`.
        resolution: Token grid `(H, W)`.
        act_layer: Activation before the output projection.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4.0,
        resolution: tuple[int, int] = (14, 14),
        act_layer: Callable[[], nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + 2 * key_dim * num_heads)
        self.proj = nn.Sequential()
        self.proj.add_module("act", act_layer())
        self.proj.add_module("ln", LinearNorm(self.val_attn_dim, dim, bn_weight_init=0.0))
        self._init_bias(num_heads, tuple(resolution))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, n, self.num_heads, -1)
            .split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        attn = ((q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * self.scale + self.bias()).softmax(dim=-1)
        record_attention(self, attn, query_prefix=0, key_prefix=0)
        x = attn @ v.transpose(1, 2)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.val_attn_dim))


class _Subsample(nn.Module):
    """Keep every `stride`-th token of an `H x W` grid in each direction."""

    def __init__(self, stride: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution[0], self.resolution[1], c)
        return x[:, :: self.stride, :: self.stride].reshape(b, -1, c)


class AttentionSubsample(_BiasTable):
    """Attention whose queries are a strided subset of the grid: a shrinking stage transition.

    Args:
        in_dim: Input token width.
        out_dim: Output token width.
        key_dim: Width of each head's queries and keys.
        num_heads: Heads.
        attn_ratio: Value width per head relative to `key_dim`.
        stride: Query grid stride; the output grid is `ceil(H / stride) x ceil(W / stride)`.
        resolution: Input token grid `(H, W)`.
        act_layer: Activation before the output projection.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 2.0,
        stride: int = 2,
        resolution: tuple[int, int] = (14, 14),
        act_layer: Callable[[], nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        resolution = tuple(resolution)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.kv = LinearNorm(in_dim, self.val_attn_dim + key_dim * num_heads)
        self.q = nn.Sequential()
        self.q.add_module("down", _Subsample(stride, resolution))
        self.q.add_module("ln", LinearNorm(in_dim, key_dim * num_heads))
        self.proj = nn.Sequential()
        self.proj.add_module("act", act_layer())
        self.proj.add_module("ln", LinearNorm(self.val_attn_dim, out_dim))
        self._init_bias(num_heads, resolution, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q(x).view(b, -1, self.num_heads, self.key_dim).transpose(1, 2)
        attn = ((q @ k.permute(0, 2, 3, 1)) * self.scale + self.bias()).softmax(dim=-1)
        record_attention(self, attn, query_prefix=0, key_prefix=0)
        x = attn @ v.transpose(1, 2)
        return self.proj(x.transpose(1, 2).reshape(b, -1, self.val_attn_dim))
