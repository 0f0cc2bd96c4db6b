"""Attention variants that drop in as `Block(attn_layer=...)`.

- Talking-heads attention (Shazeer et al., 2020, used by CaiT): learned linear mixing
  of the heads' attention logits before the softmax and of the weights after it.
- Cross-covariance attention, XCA (El-Nouby et al., XCiT, 2021): attention across
  channels instead of tokens; the `d_h x d_h` cross-covariance of l2-normalised keys and
  queries, scaled by a learned per-head temperature, mixes the value channels, so the
  cost is linear in the number of tokens.

Both take the constructor arguments `Block` passes to its attention layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.attention import Attention
from medvit.layers.attention_capture import capturing, record_attention


class TalkingHeadAttn(Attention):
    """Multi-head self-attention with talking heads.

    `proj_l` mixes the heads' logits before the softmax, `proj_w` the weights after
    it; the mixing rules out the fused kernel, so the weights are always explicit.

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide `dim`.
        qkv_bias: Bias of the joint q/k/v projection.
        qk_norm: Normalise queries and keys per head.
        attn_drop: Dropout on the (mixed) attention weights.
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
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # heads are the last axis for the mixing linears: (B, heads, N, N) -> (B, N, N, heads)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        record_attention(self, attn)  # the heads' distributions, before they are mixed
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attn else x


class XCA(nn.Module):
    """Cross-covariance attention: heads attend across their channels, not the tokens.

    Args:
        dim: Token width.
        num_heads: Number of heads (channel groups); must divide `dim`.
        qkv_bias: Bias of the joint q/k/v projection.
        qk_norm: Must be False: XCA already l2-normalises queries and keys (the argument
            exists because `Block` passes it).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Unused (accepted because `Block` passes it).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        if qk_norm:
            raise ValueError("XCA l2-normalises queries and keys itself; qk_norm must be False")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # learned per head because the l2-normalised logits lie in [-1, 1] (paper, sec. 3.2)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens `(B, N, D)` in, tokens out; `return_attn` adds the `(B, heads, d_h, d_h)` weights."""
        b, n, c = x.shape
        # (3, B, heads, d_h, N): channels play the role of the sequence, tokens of the features
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        attn = None
        if return_attn or capturing():
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            record_attention(self, attn, kind="channel")
            y = self.attn_drop(attn) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=1.0
            )
        y = y.permute(0, 3, 1, 2).reshape(b, n, c)
        y = self.proj_drop(self.proj(y))
        return (y, attn) if return_attn else y
