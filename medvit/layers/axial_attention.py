"""Gated axial attention and the gated axial transformer layer of MedT.

Valanarasu et al., "Medical Transformer: Gated Axial-Attention for Medical Image
Segmentation", MICCAI 2021 (equation 2 and Figure 2).

Self-attention runs along one axis of a feature map at a time (every column for the
height pass, every row for the width pass), with relative position encodings for the
queries, keys and values. Four learnable scalar gates set how much the relative terms
contribute::

    y_i = sum_j softmax_j(q_i k_j + G_Q q_i r^q_ij + G_K k_j r^k_ij) (G_V1 v_j + G_V2 r^v_ij)

As in the official code (`AxialAttention_dynamic`) the projections, the three logit terms
and the two output terms are batch-normalised; the gates scale the normalised terms. The
official code scales them before the normalisation, where a batch-statistics norm divides
any constant factor out again, and freezes them (`requires_grad=False`), so its gates have
no effect; here they scale the normalised terms and learn, as the paper describes, from
the official initial values (G_Q, G_K, G_V1, G_V2) = (0.1, 0.1, 1.0, 0.1). With all
gates at 1 the two agree (checked against the official model, weights mapped).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medvit.layers.attention_capture import capturing, record_attention
from medvit.layers.conv_blocks import PointwiseConv

AXES = ("height", "width")


class GatedAxialAttention(nn.Module):
    """Multi-head self-attention along the height or the width of a `(B, C, H, W)` map.

    Logits and outputs go through batch norms, so the attention is not a plain scaled
    dot product and is computed explicitly (it is small: one axis at a time).

    Args:
        dim: Channels in and out.
        num_heads: Heads; each has `dim // num_heads` value channels and half as many
            query and key channels (as the official code).
        length: Longest axis length the relative table covers (`2 * length - 1` offsets);
            shorter axes use its centre.
        axis: `height` or `width`.
        rel_pos: Relative encodings and gates; without them this is the official
            `AxialAttention_wopos` (MedT's local branch).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, length: int = 56, axis: str = "height", rel_pos: bool = True
    ) -> None:
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        if head_dim % 2:
            raise ValueError(f"dim // num_heads must be even (queries and keys get half), got {head_dim}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.length, self.axis, self.rel_pos = length, axis, rel_pos
        self.qkv = PointwiseConv(1, dim, 2 * dim, bias=False)
        nn.init.normal_(self.qkv.weight, 0.0, dim**-0.5)
        self.norm_qkv = nn.BatchNorm1d(2 * dim)
        terms = 3 if rel_pos else 1
        self.norm_logits = nn.BatchNorm2d(terms * num_heads)
        self.norm_out = nn.BatchNorm1d((2 if rel_pos else 1) * dim)
        if rel_pos:
            self.rel_table = nn.Parameter(torch.randn(2 * head_dim, 2 * length - 1) * head_dim**-0.5)
            pos = torch.arange(length)
            # entry (i, j) is the table column of query i and key j: offset i - j, centred
            self.register_buffer("rel_index", pos[:, None] - pos[None, :] + length - 1, persistent=False)
            self.gate_q = nn.Parameter(torch.tensor(0.1))
            self.gate_k = nn.Parameter(torch.tensor(0.1))
            self.gate_v1 = nn.Parameter(torch.tensor(1.0))
            self.gate_v2 = nn.Parameter(torch.tensor(0.1))

    def _eval_logits(
        self, q: torch.Tensor, k: torch.Tensor, emb_q: torch.Tensor, emb_k: torch.Tensor
    ) -> torch.Tensor:
        """Gated logits with the running-statistics norm folded into the queries and keys.

        The (n x n)-sized logit terms dominate the cost; folding the norm's scales and the
        gates into the (n)-sized operands avoids normalising, concatenating and gating them.
        The norm's shifts are dropped: they add one constant per head to every logit of a
        row, which the softmax ignores.
        """
        norm = self.norm_logits
        scale = (norm.weight * torch.rsqrt(norm.running_var + norm.eps)).view(3, 1, -1, 1, 1)
        logits = torch.einsum("bgci,bgcj->bgij", q * scale[0], k)
        logits = logits + torch.einsum("bgci,cij->bgij", q * (self.gate_q * scale[1]), emb_q)
        return logits + torch.einsum("bgcj,cji->bgij", k * (self.gate_k * scale[2]), emb_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend along `axis`.

        Args:
            x: `(B, dim, H, W)`.

        Returns:
            `(B, dim, H, W)`.
        """
        # every column (height) or row (width) becomes one sequence of the batch
        seq = x.permute(0, 3, 1, 2) if self.axis == "height" else x.permute(0, 2, 1, 3)
        b, a, c, n = seq.shape
        if self.rel_pos and n > self.length:
            raise ValueError(f"{self.axis} {n} exceeds the relative position table's length {self.length}")
        heads, hd = self.num_heads, self.head_dim
        qkv = self.norm_qkv(self.qkv(seq.reshape(b * a, c, n))).view(b * a, heads, 2 * hd, n)
        q, k, v = qkv.split([hd // 2, hd // 2, hd], dim=2)
        if not self.rel_pos:
            attn = self.norm_logits(torch.einsum("bgci,bgcj->bgij", q, k)).softmax(dim=-1)
            out = self.norm_out(torch.einsum("bgij,bgcj->bgci", attn, v).reshape(b * a, c, n))
        else:
            emb = self.rel_table[:, self.rel_index[:n, :n]]
            emb_q, emb_k, emb_v = emb.split([hd // 2, hd // 2, hd], dim=0)
            if self.training:
                terms = torch.cat(
                    [
                        torch.einsum("bgci,bgcj->bgij", q, k),
                        torch.einsum("bgci,cij->bgij", q, emb_q),
                        torch.einsum("bgcj,cji->bgij", k, emb_k),
                    ],
                    dim=1,
                )
                qk, q_rel, k_rel = self.norm_logits(terms).view(b * a, 3, heads, n, n).unbind(dim=1)
                logits = qk + self.gate_q * q_rel + self.gate_k * k_rel
            else:
                logits = self._eval_logits(q, k, emb_q, emb_k)
            attn = logits.softmax(dim=-1)
            out_v = torch.einsum("bgij,bgcj->bgci", attn, v)
            out_rel = torch.einsum("bgij,cij->bgci", attn, emb_v)
            # channel-interleaved as the official code, so its norm's channels line up
            out = self.norm_out(torch.stack([out_v, out_rel], dim=3).reshape(b * a, 2 * c, n))
            gates_v = torch.stack([self.gate_v1, self.gate_v2])
            out = (out.view(b * a, c, 2, n) * gates_v.view(1, 1, 2, 1)).sum(dim=2)
        if capturing():  # one sequence per row / column: rows are grouped in the batch
            axis = 0 if self.axis == "height" else 1
            record_attention(self, attn, query_grid=(n,), query_prefix=0, key_prefix=0, axes=(axis,))
        out = out.view(b, a, c, n)
        return out.permute(0, 2, 3, 1) if self.axis == "height" else out.permute(0, 2, 1, 3)


class GatedAxialBlock(nn.Module):
    """The gated axial transformer layer (official `AxialBlock_dynamic`, expansion 2).

    1x1 conv down to `width`, height attention, width attention, optional 2x average
    pooling, 1x1 conv up to `2 * width`, residual (projected when the shape changes).

    Args:
        in_chans: Input channels.
        width: Attention width; the output has `2 * width` channels.
        num_heads: Attention heads.
        size: `(H, W)` of the input map (the relative tables' lengths).
        stride: 1, or 2 to halve the map after the attention.
        rel_pos: Relative encodings and gates (False: the official `AxialBlock_wopos`).
    """

    expansion = 2

    def __init__(
        self,
        in_chans: int,
        width: int,
        num_heads: int = 8,
        size: tuple[int, int] = (56, 56),
        stride: int = 1,
        rel_pos: bool = True,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        out_chans = width * self.expansion
        self.conv_down = PointwiseConv(2, in_chans, width, bias=False)
        self.norm1 = nn.BatchNorm2d(width)
        self.attn_h = GatedAxialAttention(width, num_heads, size[0], "height", rel_pos)
        self.attn_w = GatedAxialAttention(width, num_heads, size[1], "width", rel_pos)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else None
        self.conv_up = PointwiseConv(2, width, out_chans, bias=False)
        self.norm2 = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride > 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chans)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv_down(x)))
        out = self.attn_w(self.attn_h(out))
        if self.pool is not None:
            out = self.pool(out)
        out = self.norm2(self.conv_up(self.act(out)))
        return self.act(out + (self.shortcut(x) if self.shortcut is not None else x))
