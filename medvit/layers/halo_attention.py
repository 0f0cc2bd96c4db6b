"""Blocked local self-attention with haloed keys and values (HaloNet's attention).

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
CVPR 2021: the map is cut into non-overlapping `b x b` query blocks; each block attends
to a `(b + 2h) x (b + 2h)` window of keys/values (the block plus a halo of `h` pixels,
zero-padded at the border), with relative height/width position logits. A stride-2
layer subsamples the queries inside each block (strided query projection).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.attention_capture import capturing, record_attention
from medvit.layers.rel_pos_attention import rel_logits_1d


class HaloRelPosEmbed(nn.Module):
    """Relative height and width tables for `block x block` queries against a window.

    Args:
        block_size: Query block size (after any query stride).
        win_size: Key window size (`block + 2 * halo`).
        dim_head: Query width per head.
        scale: Initial standard deviation of the tables.
    """

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.win_size = win_size
        self.height_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * scale)
        self.width_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        n, nb, _, d = q.shape
        bs, ws = self.block_size, self.win_size
        q = q.reshape(n * nb, bs, bs, d)
        lw = rel_logits_1d(q, self.width_rel, ws)  # (., y, x, kx)
        lh = rel_logits_1d(q.transpose(1, 2), self.height_rel, ws)  # (., x, y, ky)
        logits = lh.transpose(1, 2)[:, :, :, :, None] + lw[:, :, :, None, :]
        return logits.reshape(n, nb, bs * bs, ws * ws)


class HaloAttention(nn.Module):
    """Multi-head blocked local attention with haloed keys/values.

    Parameter names follow timm's `HaloAttn` (`q`, `kv`, `pos_embed.height_rel/width_rel`).

    Args:
        dim: Input channels.
        dim_out: Output channels (the value width); defaults to `dim`.
        stride: 1, or 2 (queries strided inside each block).
        num_heads: Attention heads.
        dim_head: Query/key width per head; defaults to `dim_out / num_heads`.
        block_size: Query block size `b`.
        halo_size: Halo `h` around each block.
        qkv_bias: Bias on the projections.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the attention width {dim_out}")
        if stride not in (1, 2) or block_size % stride:
            raise ValueError(f"stride must be 1 or 2 and divide block_size ({block_size}), got {stride}")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or dim_out // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = dim_out
        self.scale = self.dim_head_qk**-0.5
        self.block_size = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.block_stride = stride
        self.block_size_ds = block_size // stride
        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=stride, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias)
        self.pos_embed = HaloRelPosEmbed(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale)
        std = dim**-0.5
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        bs, bsd = self.block_size, self.block_size_ds
        if h % bs or w % bs:
            raise ValueError(f"block_size {bs} must divide the feature map size {(h, w)}")
        nh, nw = h // bs, w // bs
        nb = nh * nw
        q = self.q(x).reshape(b * self.num_heads, self.dim_head_qk, nh, bsd, nw, bsd)
        q = q.permute(0, 2, 4, 3, 5, 1).reshape(b * self.num_heads, nb, bsd * bsd, self.dim_head_qk)
        kv = F.pad(self.kv(x), [self.halo_size] * 4)
        kv = kv.unfold(2, self.win_size, bs).unfold(3, self.win_size, bs)  # (B, C, nh, nw, ws, ws)
        kv = kv.reshape(b * self.num_heads, self.dim_head_qk + self.dim_head_v, nb, -1).permute(0, 2, 3, 1)
        k, v = kv.split([self.dim_head_qk, self.dim_head_v], dim=-1)
        attn = ((q @ k.transpose(-1, -2)) * self.scale + self.pos_embed(q)).softmax(dim=-1)
        if capturing():  # (B * heads, blocks, ...) -> (B * blocks, heads, ...)
            ratio = bs / bsd  # queries are subsampled when the layer strides
            record_attention(
                self,
                attn.view(b, self.num_heads, nb, *attn.shape[-2:]).transpose(1, 2).flatten(0, 1),
                query_grid=(bsd, bsd), key_grid=(self.win_size, self.win_size), query_prefix=0, key_prefix=0,
                tiled_grid=(nh * bsd, nw * bsd), key_step=(1 / ratio, 1 / ratio),
                key_offset=(-self.halo_size / ratio, -self.halo_size / ratio),
            )
        out = (attn @ v).reshape(b, self.num_heads, nh, nw, bsd, bsd, self.dim_head_v)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, self.dim_out_v, nh * bsd, nw * bsd)
