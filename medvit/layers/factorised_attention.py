"""Attention factorised over time and space for video tokens laid out `(B, T, N, D)`.

ViViT's Model 3 (spatial then temporal self-attention in each block) and Model 4 (half
the heads attend within a frame, half across frames at the same location).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.attention import Attention
from medvit.layers.attention_capture import attend, attention_layout
from medvit.layers.drop import DropPath
from medvit.layers.mlp import Mlp


def attend_along(attn: nn.Module, x: torch.Tensor, axis: str) -> torch.Tensor:
    """Apply a sequence attention to `(B, T, N, D)` tokens within frames or across them.

    Args:
        attn: A module mapping `(B', L, D)` to `(B', L, D)`.
        x: Tokens `(B, T, N, D)`.
        axis: `space` (sequences of the N tokens of one frame) or `time` (sequences of
            the T tokens at one location).
    """
    b, t, n, d = x.shape
    if axis == "space":
        with attention_layout(axes=(1, 2), query_prefix=0, key_prefix=0):
            return attn(x.reshape(b * t, n, d)).reshape(b, t, n, d)
    with attention_layout(axes=(0,), query_grid=(t,), query_prefix=0, key_prefix=0):
        y = attn(x.transpose(1, 2).reshape(b * n, t, d))
    return y.reshape(b, n, t, d).transpose(1, 2)


class FactorisedDotProductAttention(nn.Module):
    """Half of the heads attend over space, the other half over time (ViViT Model 4).

    Takes the same arguments as `Attention`, so it drops into `Block(attn_layer=...)`;
    the tokens must be laid out `(B, T, N, D)`.

    Args:
        dim: Token width.
        num_heads: Number of heads; even, and dividing `dim`.
        qkv_bias: Bias of the joint q/k/v projection.
        qk_norm: Unsupported here (kept for the `Block` signature); must be False.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Unused (kept for the `Block` signature).
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
    ) -> None:
        super().__init__()
        if num_heads < 2 or num_heads % 2 or dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must be even and divide the width ({dim})")
        if qk_norm:
            raise ValueError("qk_norm is not supported by factorised dot-product attention")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, d = x.shape
        h = self.num_heads // 2
        p = self.attn_drop if self.training else 0.0
        qkv = self.qkv(x).reshape(b, t, n, 3, 2, h, self.head_dim)
        # spatial heads: sequences over n for each (b, t)
        qs, ks, vs = qkv[..., 0, :, :].permute(3, 0, 1, 4, 2, 5).unbind(0)
        xs = attend(self, qs, ks, vs, dropout_p=p, axes=(1, 2), query_prefix=0, key_prefix=0)  # (b, t, h, n, hd)
        xs = xs.permute(0, 1, 3, 2, 4)
        # temporal heads: sequences over t for each (b, n)
        qt, kt, vt = qkv[..., 1, :, :].permute(3, 0, 2, 4, 1, 5).unbind(0)
        xt = attend(self, qt, kt, vt, dropout_p=p, query_grid=(t,), axes=(0,), query_prefix=0)  # (b, n, h, t, hd)
        xt = xt.permute(0, 3, 1, 2, 4)
        out = torch.cat([xs, xt], dim=3).reshape(b, t, n, d)
        return self.proj_drop(self.proj(out))


class FactorisedSelfAttentionBlock(nn.Module):
    """Spatial self-attention, then temporal self-attention, then the MLP (ViViT Model 3).

    Each sub-layer is pre-norm with its own residual. Zeroing `temporal_attn.proj` makes
    the block the image block applied frame by frame (used when inflating a 2D ViT).

    Args:
        dim: Token width.
        num_heads: Attention heads (both attentions).
        mlp_ratio: MLP hidden width relative to `dim`.
        qkv_bias: Bias of the q/k/v projections.
        qk_norm: Per-head query/key normalisation.
        proj_drop: Dropout after attention and MLP projections.
        attn_drop: Dropout on attention weights.
        init_values: Unsupported (kept for the `Block` signature); must be None.
        drop_path: Stochastic-depth probability.
        act_layer: MLP activation.
        norm_layer: Norm class.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if init_values is not None:
            raise ValueError("LayerScale is not supported by the factorised self-attention block")
        kw = dict(num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                  proj_drop=proj_drop, norm_layer=norm_layer)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, **kw)
        self.temporal_norm = norm_layer(dim)
        self.temporal_attn = Attention(dim, **kw)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(attend_along(self.attn, self.norm1(x), "space"))
        x = x + self.drop_path(attend_along(self.temporal_attn, self.temporal_norm(x), "time"))
        return x + self.drop_path(self.mlp(self.norm2(x)))
