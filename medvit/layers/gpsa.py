"""Gated positional self-attention (GPSA) of ConViT (d'Ascoli et al., ICML 2021).

Each head mixes content attention (softmax of q.k) with positional attention (softmax of
a learned linear function of the relative offset between patches), through a learned
per-head gate. With the locality initialisation each head starts as a soft convolution
kernel centred on its own offset, so early training behaves like a CNN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.attention_capture import record_attention


def relative_positions_2d(
    grid_size: Sequence[int], device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Offsets between all pairs of tokens of a row-major 2D grid, `(N, N, 3)`.

    The last axis is (dx, dy, dx^2 + dy^2), key minus query, x along the width: the
    features ConViT's positional attention is linear in.
    """
    gh, gw = (int(g) for g in grid_size)
    ys, xs = torch.meshgrid(
        torch.arange(gh, device=device, dtype=torch.float32),
        torch.arange(gw, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dx = xs[None, :] - xs[:, None]
    dy = ys[None, :] - ys[:, None]
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1).to(dtype or torch.float32)


class GPSA(nn.Module):
    """Gated positional self-attention over the patch tokens of a fixed 2D grid.

    Takes the same arguments as `Attention`, so it drops into `Block(attn_layer=...)`
    through a `functools.partial` fixing `grid_size` and `locality_strength`. Parameter
    names are timm's (`qk`, `v`, `pos_proj`, `gating_param`).

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide `dim`.
        qkv_bias: Bias of the query/key and value projections.
        qk_norm: Normalise queries and keys per head.
        attn_drop: Dropout on the mixed attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by `qk_norm`.
        grid_size: Token grid `(height, width)` the positional attention is defined on.
        locality_strength: How sharply the initial positional attention focuses on each
            head's offset (ConViT's alpha).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        grid_size: Sequence[int] = (14, 14),
        locality_strength: float = 1.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        self.grid_size = tuple(int(g) for g in grid_size)
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"grid_size must be two positive ints, got {tuple(grid_size)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.local_init()

    @torch.no_grad()
    def local_init(self) -> None:
        """ConViT's locality initialisation: identity values, one kernel offset per head.

        The heads are laid out on a sqrt(heads) x sqrt(heads) kernel; heads beyond the
        largest square keep their random positional weights, as in the reference code.
        A model's generic weight init must run before this, or it undoes it.
        """
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
        k = int(math.isqrt(self.num_heads))
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        rows = []
        for h2 in range(k):
            for h1 in range(k):
                rows.append([2.0 * (h2 - center), 2.0 * (h1 - center), -1.0])
        # position = h1 + k * h2, i.e. h1 varies fastest, as the loop order above gives
        kernel = torch.tensor(rows, dtype=self.pos_proj.weight.dtype)
        self.pos_proj.weight[: k * k].copy_(kernel)
        self.pos_proj.weight.mul_(self.locality_strength)

    def positional_attention(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Softmax of the positional scores, `(heads, N, N)`; independent of the input."""
        rel = relative_positions_2d(self.grid_size, device=device, dtype=dtype)
        return self.pos_proj(rel).permute(2, 0, 1).softmax(dim=-1)

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        if n != math.prod(self.grid_size):
            raise ValueError(
                f"GPSA was built for a {self.grid_size} grid ({math.prod(self.grid_size)} tokens), "
                f"got {n} tokens"
            )
        qk = self.qk(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(qk[0]), self.k_norm(qk[1])
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        content = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1.0 - gate) * content + gate * self.positional_attention(x.device, x.dtype)
        # both parts are distributions; renormalising only matters in low precision
        attn = attn / attn.sum(dim=-1, keepdim=True)
        record_attention(self, attn, query_grid=self.grid_size, query_prefix=0)
        x = self.attn_drop(attn) @ v
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))
        return (x, attn) if return_attn else x
