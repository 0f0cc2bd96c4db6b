"""Cross-attention fusion block of CrossViT (Chen et al., ICCV 2021).

One branch's class token, projected to the other branch's width, is put in front of that
branch's patch tokens and attends over them with class attention (`ClassAttn`: the
first token is the only query, so the cost is linear in the sequence length). Unlike
CaiT's class-attention block there is no MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.class_attention import ClassAttn
from medvit.layers.drop import DropPath


class CrossAttentionBlock(nn.Module):
    """first_token + DropPath(ClassAttn(norm1(x))).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        qkv_bias: Bias of the query, key and value projections.
        proj_drop: Dropout after the attention projection.
        attn_drop: Dropout on the attention weights.
        drop_path: Stochastic-depth probability.
        norm_layer: Norm class (called with `dim`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttn(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, N, D)` tokens to the updated first token, `(B, 1, D)`."""
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))
