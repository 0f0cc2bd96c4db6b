"""2D sliding-window attention with global tokens (Vision Longformer).

Each patch token attends to the patch tokens inside a `(2w+1) x (2w+1)` window centred
on it and to the global tokens; global tokens attend to everything. The window is
realised as an additive mask over full attention: exact and simple, with O(N^2) memory,
which is affordable at the 56 x 56 token grid of the first stage for small batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.attention_capture import capturing, record_attention


class LongformerAttention2d(nn.Module):
    """Multi-head attention restricted to a 2D window, plus global (prefix) tokens.

    The input is `(B, G + H*W, D)`: the `num_global` global tokens first, then the patch
    tokens of the `grid_size` grid in row-major order.

    Args:
        dim: Token width.
        num_heads: Attention heads; must divide `dim`.
        grid_size: Patch-token grid `(H, W)`.
        window_size: Half-width `w` of the window; a patch token sees `(2w+1)^2` patches.
        num_global: Number of global tokens in front of the patch tokens.
        rel_pos_bias: Learned per-head 2D relative position bias between patch tokens
            (one table entry per window offset) and one bias per head for each of the
            global-to-patch, patch-to-global and global-to-global pairs.
        qkv_bias: Bias of the q/k/v projection.
        qk_norm: Per-head query/key normalisation.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by `qk_norm`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: Sequence[int] = (14, 14),
        window_size: int = 7,
        num_global: int = 1,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        if num_global < 0:
            raise ValueError(f"num_global must be >= 0, got {num_global}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.grid_size = tuple(int(g) for g in grid_size)
        self.window_size = window_size
        self.num_global = num_global
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            side = 2 * window_size + 1
            self.rel_pos_table = nn.Parameter(torch.zeros(num_heads, side * side))
            self.global_bias = nn.Parameter(torch.zeros(num_heads, 3)) if num_global else None
            nn.init.trunc_normal_(self.rel_pos_table, std=0.02)
        else:
            self.rel_pos_table = None
            self.global_bias = None

    def _offsets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column offsets between every pair of patch tokens, `(N, N)` each."""
        h, w = self.grid_size
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        ys, xs = ys.flatten(), xs.flatten()
        return ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]

    def attn_bias(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive bias `(heads or 1, G + N, G + N)`: -inf outside the window."""
        g, r = self.num_global, self.window_size
        dy, dx = self._offsets(device)
        n = dy.shape[0]
        inside = (dy.abs() <= r) & (dx.abs() <= r)
        heads = self.num_heads if self.rel_pos_table is not None else 1
        bias = torch.zeros(heads, g + n, g + n, device=device, dtype=dtype)
        local = torch.zeros(heads, n, n, device=device, dtype=dtype)
        if self.rel_pos_table is not None:
            side = 2 * r + 1
            # offsets outside the window are masked anyway; clamping keeps the gather valid
            idx = (dy.clamp(-r, r) + r) * side + (dx.clamp(-r, r) + r)
            local = self.rel_pos_table.to(dtype)[:, idx]
            if self.global_bias is not None:
                gb = self.global_bias.to(dtype)
                bias[:, :g, g:] = gb[:, 0, None, None]
                bias[:, g:, :g] = gb[:, 1, None, None]
                bias[:, :g, :g] = gb[:, 2, None, None]
        bias[:, g:, g:] = local.masked_fill(~inside, float("-inf"))
        return bias

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        expected = self.num_global + self.grid_size[0] * self.grid_size[1]
        if n != expected:
            raise ValueError(
                f"expected {expected} tokens ({self.num_global} global + grid {self.grid_size}), got {n}"
            )
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.attn_bias(x.device, q.dtype).unsqueeze(0)
        attn = None
        if return_attn or capturing():
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            record_attention(
                self, attn, query_grid=self.grid_size, query_prefix=self.num_global, key_prefix=self.num_global
            )
            x = self.attn_drop(attn) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        x = x.transpose(1, 2).reshape(b, n, c)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attn else x
