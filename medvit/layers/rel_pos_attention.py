"""Global multi-head self-attention over a feature map with 2D relative position logits.

The attention of BoTNet's bottleneck transformer block (Srinivas et al., "Bottleneck
Transformers for Visual Recognition", CVPR 2021, Figure 4): 1x1 query/key/value
projections, content logits `q k^T` plus relative logits `q r^T`, where `r` sums a
relative-height and a relative-width embedding shared by all heads. The relative tables
(`2 L - 1` rows per axis) tie the layer to one feature-map size. `rel_logits_1d` is also
used by the blocked (halo) attention of HaloNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from medvit.layers.attention_capture import record_attention
from medvit.layers.helpers import to_ntuple


def rel_logits_1d(q: torch.Tensor, rel_k: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Relative logits along the last spatial axis of `q`.

    Query `i` and key `j` use table row `j - i + num_keys - 1`, so with `num_keys` equal to
    the query length this is the usual centred table; for halo windows the keys are the
    window (queries sit `halo` rows into it).

    Args:
        q: Queries `(N, A, L, D)` (`A` the other axis, `L` the axis the table describes).
        rel_k: Table `(R, D)`.
        num_keys: Key positions along the axis.

    Returns:
        Logits `(N, A, L, num_keys)`.
    """
    length = q.shape[-2]
    logits = q @ rel_k.transpose(0, 1)
    idx = torch.arange(num_keys, device=q.device)[None, :] - torch.arange(length, device=q.device)[:, None]
    idx = (idx + num_keys - 1).expand(*logits.shape[:-2], length, num_keys)
    return logits.gather(-1, idx)


class RelPosEmbed2d(nn.Module):
    """Relative height and width tables giving `(N, H*W, H*W)` position logits.

    Args:
        feat_size: Map size `(H, W)`.
        dim_head: Query width per head.
        scale: Initial standard deviation of the tables.
    """

    def __init__(self, feat_size: Sequence[int], dim_head: int, scale: float) -> None:
        super().__init__()
        self.height, self.width = feat_size
        self.height_rel = nn.Parameter(torch.randn(2 * self.height - 1, dim_head) * scale)
        self.width_rel = nn.Parameter(torch.randn(2 * self.width - 1, dim_head) * scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        n, hw, d = q.shape
        h, w = self.height, self.width
        q = q.reshape(n, h, w, d)
        lw = rel_logits_1d(q, self.width_rel, w)  # (n, h, w, w')
        lh = rel_logits_1d(q.transpose(1, 2), self.height_rel, h)  # (n, w, h, h')
        logits = lh.transpose(1, 2)[:, :, :, :, None] + lw[:, :, :, None, :]
        return logits.reshape(n, hw, hw)


class RelPosSelfAttention2d(nn.Module):
    """BoTNet's MHSA: all-to-all attention over the map, optional 2x2 average pool after it.

    Parameter names follow timm's `BottleneckAttn` (`qkv`, `pos_embed.height_rel/width_rel`).

    Args:
        dim: Input channels.
        dim_out: Output channels (the value width); defaults to `dim`.
        feat_size: Input map size; the relative tables are built for it.
        stride: 1, or 2 for a 2x2 average pool after the attention (the paper's downsampling).
        num_heads: Attention heads.
        dim_head: Query/key width per head; defaults to `dim_out / num_heads`.
        qkv_bias: Bias on the projection.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        feat_size: int | Sequence[int] = 14,
        stride: int = 1,
        num_heads: int = 4,
        dim_head: int | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the attention width {dim_out}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.feat_size = to_ntuple(feat_size, 2, "feat_size")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or dim_out // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = dim_out
        self.scale = self.dim_head_qk**-0.5
        self.qkv = nn.Conv2d(dim, 2 * self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias)
        self.pos_embed = RelPosEmbed2d(self.feat_size, self.dim_head_qk, self.scale)
        self.pool = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        nn.init.trunc_normal_(self.qkv.weight, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if (h, w) != self.feat_size:
            raise ValueError(f"this attention layer was built for a {self.feat_size} map, got {(h, w)}")
        q, k, v = self.qkv(x).split([self.dim_out_qk, self.dim_out_qk, self.dim_out_v], dim=1)
        q = q.reshape(b * self.num_heads, self.dim_head_qk, h * w).transpose(1, 2)
        k = k.reshape(b * self.num_heads, self.dim_head_qk, h * w)
        v = v.reshape(b * self.num_heads, self.dim_head_v, h * w).transpose(1, 2)
        attn = ((q @ k) * self.scale + self.pos_embed(q)).softmax(dim=-1)
        record_attention(self, attn.view(b, self.num_heads, h * w, h * w), query_grid=(h, w), query_prefix=0)
        out = (attn @ v).transpose(1, 2).reshape(b, self.dim_out_v, h, w)
        return self.pool(out)
