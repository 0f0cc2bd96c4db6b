"""Class attention: only the class token queries the patch tokens (Touvron et al., CaiT).

Class-attention layers come after the self-attention stage: the patch tokens are frozen
and a class token, inserted late, gathers them into the vector the classifier reads.
XCiT reuses the same attention in its last layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.attention_capture import attend
from medvit.layers.block import Block


class ClassAttn(nn.Module):
    """Multi-head attention whose only query is the first (class) token.

    Keys and values come from every token, the class token included, so a layer costs
    O(N) instead of O(N^2).

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide `dim`.
        qkv_bias: Bias of the q, k and v projections.
        qk_norm: Normalise queries and keys per head.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by `qk_norm`.
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
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # separate q, k, v (not one qkv) so that only the class token is projected to a query
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update of the class token `x[:, :1]` from all tokens `x`, `(B, 1, D)`."""
        b, n, c = x.shape
        q = self.q(x[:, :1]).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        y = attend(
            self, q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
            query_grid=(), query_prefix=1, key_prefix=1,
        )
        y = y.transpose(1, 2).reshape(b, 1, c)
        return self.proj_drop(self.proj(y))


class ClassAttentionBlock(Block):
    """CaiT's class-attention layer: a pre-norm block that updates only the class token.

    `cls + DropPath(LS(CA(norm1([cls, x]))))`, then `cls + DropPath(LS(mlp(norm2(cls))))`;
    the patch tokens `x` pass through unchanged. The sub-layers are `Block`'s, with
    `ClassAttn` as the default attention.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        attn_layer: Attention class (called as by `Block`); its output is the class
            token's update, `(B, 1, D)`.
        **kwargs: The other arguments of `Block` (`mlp_ratio`, `qkv_bias`,
            `init_values`, `drop_path`, `norm_layer`, ...).
    """

    def __init__(
        self, dim: int, num_heads: int, attn_layer: Callable[..., nn.Module] = ClassAttn, **kwargs: Any
    ) -> None:
        super().__init__(dim, num_heads, attn_layer=attn_layer, **kwargs)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """New class token `(B, 1, D)` from the patch tokens `x` `(B, N, D)` and the class token."""
        u = torch.cat([cls_token, x], dim=1)
        cls_token = cls_token + self.drop_path1(self.ls1(self.attn(self.norm1(u))))
        return cls_token + self.drop_path2(self.ls2(self.mlp(self.norm2(cls_token))))
