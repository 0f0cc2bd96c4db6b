"""Multiscale pooling attention with decomposed relative positions (MViTv2).

Queries, keys and values are pooled per head by a depthwise strided conv followed by a
LayerNorm; the attention logits get decomposed (height + width) relative position terms,
and the pooled query is added back to the output (residual pooling).
Parameter names follow timm's `MultiScaleAttention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.attention_capture import record_attention


def _rel_index(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Index into a relative table for every (query, key) pair of one axis, scaled to the
    finer of the two grids as the reference implementation does."""
    q_ratio = max(k_len / q_len, 1.0)
    k_ratio = max(q_len / k_len, 1.0)
    dist = (
        torch.arange(q_len, device=device).unsqueeze(-1) * q_ratio
        - torch.arange(k_len, device=device).unsqueeze(0) * k_ratio
    )
    return (dist + (k_len - 1) * k_ratio).long()


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    q_size: Sequence[int],
    k_size: Sequence[int],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
) -> torch.Tensor:
    """Add height and width relative position logits to `attn` `(B, heads, Nq, Nk)`."""
    (qh, qw), (kh, kw) = q_size, k_size
    rel_h = rel_pos_h[_rel_index(qh, kh, q.device)]
    rel_w = rel_pos_w[_rel_index(qw, kw, q.device)]
    b, heads, _, dim = q.shape
    r_q = q.reshape(b, heads, qh, qw, dim)
    bias_h = torch.einsum("byhwc,hkc->byhwk", r_q, rel_h)
    bias_w = torch.einsum("byhwc,wkc->byhwk", r_q, rel_w)
    attn = attn.view(b, heads, qh, qw, kh, kw) + bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)
    return attn.view(b, heads, qh * qw, kh * kw)


class PoolingAttention(nn.Module):
    """MViTv2 attention: conv-pooled q/k/v, decomposed relative positions, residual pooling.

    Args:
        dim: Input width.
        dim_out: Attention width (and output width).
        feat_size: Input token grid `(H, W)`, which sizes the relative position tables.
        num_heads: Attention heads.
        qkv_bias: Bias of the q/k/v projection.
        kernel_q: Query pooling kernel.
        kernel_kv: Key/value pooling kernel.
        stride_q: Query pooling stride (the block's downsampling).
        stride_kv: Key/value pooling stride.
        residual_pooling: Add the pooled query to the attention output.
        rel_pos: Use decomposed relative position embeddings.
        norm_layer: Norm after each pooling (called with the head width).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        feat_size: Sequence[int],
        num_heads: int = 1,
        qkv_bias: bool = True,
        kernel_q: Sequence[int] = (3, 3),
        kernel_kv: Sequence[int] = (3, 3),
        stride_q: Sequence[int] = (1, 1),
        stride_kv: Sequence[int] = (1, 1),
        residual_pooling: bool = True,
        rel_pos: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"width {dim_out} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.head_dim = dim_out // num_heads
        self.scale = self.head_dim**-0.5
        self.residual_pooling = residual_pooling
        self.qkv = nn.Linear(dim, dim_out * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)

        def pool(kernel: Sequence[int], stride: Sequence[int]) -> nn.Module | None:
            # a 1x1 stride-1 pool is the identity, and the reference builds none
            if math.prod(kernel) == 1 and math.prod(stride) == 1:
                return None
            return nn.Conv2d(
                self.head_dim, self.head_dim, tuple(kernel), stride=tuple(stride),
                padding=tuple(k // 2 for k in kernel), groups=self.head_dim, bias=False,
            )

        self.pool_q = pool(kernel_q, stride_q)
        self.norm_q = norm_layer(self.head_dim) if self.pool_q is not None else None
        self.pool_k = pool(kernel_kv, stride_kv)
        self.norm_k = norm_layer(self.head_dim) if self.pool_k is not None else None
        self.pool_v = pool(kernel_kv, stride_kv)
        self.norm_v = norm_layer(self.head_dim) if self.pool_v is not None else None

        if rel_pos:
            q_size = [s // st for s, st in zip(feat_size, stride_q)]
            kv_size = [s // st for s, st in zip(feat_size, stride_kv)]
            n = 2 * max(max(q_size), max(kv_size)) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(n, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(n, self.head_dim))
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def _pool(
        self, t: torch.Tensor, pool: nn.Module | None, norm: nn.Module | None, size: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        if pool is None:
            return t, list(size)
        b, heads, _, c = t.shape
        t = pool(t.reshape(b * heads, *size, c).permute(0, 3, 1, 2))
        new_size = list(t.shape[2:])
        t = t.reshape(b, heads, c, -1).transpose(2, 3)
        return norm(t), new_size

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Attend over `x` `(B, H*W, dim)`; returns `(B, H'*W', dim_out)` and `(H', W')`."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, q_size = self._pool(q, self.pool_q, self.norm_q, feat_size)
        k, k_size = self._pool(k, self.pool_k, self.norm_k, feat_size)
        v, _ = self._pool(v, self.pool_v, self.norm_v, feat_size)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_h is not None:
            attn = add_decomposed_rel_pos(attn, q, q_size, k_size, self.rel_pos_h, self.rel_pos_w)
        attn = attn.softmax(dim=-1)
        prefix = 1 if getattr(self, "has_cls_token", False) else 0
        record_attention(
            self, attn, query_grid=q_size, key_grid=k_size, query_prefix=prefix, key_prefix=prefix
        )
        x = attn @ v
        if self.residual_pooling:
            x = x + q
        x = x.transpose(1, 2).reshape(b, -1, self.dim_out)
        return self.proj(x), q_size
