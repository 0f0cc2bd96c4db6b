"""Pooling of a token sequence into one vector: class token, global average, MAP.

MAP (multi-head attention pooling) is from "Scaling Vision Transformers"
(Zhai et al., 2022): a learned latent query attends over the tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.attention_capture import attend
from medvit.layers.mlp import Mlp

POOL_TYPES = ("token", "avg", "map", "")


def check_pool_type(pool_type: str) -> str:
    if pool_type not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
    return pool_type


def pool_tokens(x: torch.Tensor, pool_type: str, num_prefix_tokens: int) -> torch.Tensor:
    """Class-token (`token`), mean of the patch tokens (`avg`) or no pooling (``)."""
    if pool_type == "token":
        return x[:, 0]
    if pool_type == "avg":
        return x[:, num_prefix_tokens:].mean(dim=1)
    return x


class AttentionPoolLatent(nn.Module):
    """MAP head: one learned query attends over the tokens, followed by a residual MLP.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `dim`.
        qkv_bias: Bias of the query and key/value projections.
        norm_layer: Norm before the MLP.
        act_layer: MLP activation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.num_heads, self.head_dim)
        kv = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        y = attend(self, q.transpose(1, 2), k, v, query_grid=(), query_prefix=1)
        y = self.proj(y.transpose(1, 2).reshape(b, 1, c))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
