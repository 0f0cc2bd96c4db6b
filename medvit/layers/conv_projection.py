"""Convolutional token embedding and convolutional-projection attention (CvT).

Both work on token grids of any `spatial_dims` (2 for images, 3 for volumes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.attention_capture import record_attention
from medvit.layers.helpers import batch_norm_nd, conv_nd


class ConvEmbed(nn.Module):
    """Overlapping strided conv, then LayerNorm over channels; returns tokens and their grid.

    Args:
        spatial_dims: 2 or 3.
        in_chans: Input channels.
        embed_dim: Output width.
        patch_size: Conv kernel.
        stride: Conv stride.
        padding: Conv padding.
        norm_layer: Norm over the token width; None for none (MViT v2).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        embed_dim: int,
        patch_size: int = 7,
        stride: int = 4,
        padding: int = 2,
        norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.proj = conv_nd(spatial_dims)(in_chans, embed_dim, patch_size, stride=stride, padding=padding)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), list(x.shape[2:])


class ConvProjAttention(nn.Module):
    """Attention whose q/k/v come from a depthwise conv + BatchNorm over the token grid
    (keys/values strided to cut their number), then a linear projection.

    Prefix (class) tokens bypass the convolutions.

    Args:
        spatial_dims: 2 or 3.
        dim: Input width.
        dim_out: Attention and output width.
        num_heads: Attention heads.
        qkv_bias: Bias of the q/k/v linears.
        kernel_size: Depthwise conv kernel.
        stride_q: Query conv stride.
        stride_kv: Key/value conv stride.
        num_prefix_tokens: Leading tokens not on the grid.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        dim_out: int,
        num_heads: int,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        num_prefix_tokens: int = 0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"width {dim_out} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dim_out = dim_out
        # CvT scales by the full width, not the head width; kept for checkpoint fidelity
        self.scale = dim_out**-0.5
        self.num_prefix_tokens = num_prefix_tokens

        def conv_proj(stride: int) -> nn.Sequential:
            conv = conv_nd(spatial_dims)(
                dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False
            )
            return nn.Sequential(OrderedDict(conv=conv, bn=batch_norm_nd(spatial_dims)(dim)))

        self.conv_proj_q = conv_proj(stride_q)
        self.conv_proj_k = conv_proj(stride_kv)
        self.conv_proj_v = conv_proj(stride_kv)
        self.proj_q = nn.Linear(dim, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim_out, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    def _conv(self, conv: nn.Module, grid_map: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return torch.cat([prefix, conv(grid_map).flatten(2).transpose(1, 2)], dim=1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Attend over `x` `(B, prefix + prod(grid), dim)`; returns `(B, same, dim_out)`."""
        b, n, c = x.shape
        prefix, tokens = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        grid_map = tokens.transpose(1, 2).reshape(b, c, *grid)
        q = self._heads(self.proj_q(self._conv(self.conv_proj_q, grid_map, prefix)))
        k = self._heads(self.proj_k(self._conv(self.conv_proj_k, grid_map, prefix)))
        v = self._heads(self.proj_v(self._conv(self.conv_proj_v, grid_map, prefix)))
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        record_attention(self, attn, query_prefix=self.num_prefix_tokens, key_prefix=self.num_prefix_tokens)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(b, -1, self.dim_out)
        return self.proj_drop(self.proj(x))
