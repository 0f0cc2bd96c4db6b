"""Multiscale pooling attention of MViT v1, over 2D or 3D token grids with a class token.

Queries, keys and values are pooled per head (a depthwise strided conv followed by a
LayerNorm, or a max/avg pool without norm); there are no relative positions and no residual
pooling. A leading class token is kept out of the pooling and put back in front, as in
the reference (PySlowFast) implementation. The projections and the attention itself are
`PoolingAttention`'s; only the pooling differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import check_spatial_dims, conv_nd
from medvit.layers.pooling_attention import PoolingAttention

POOL_MODES = ("conv", "max", "avg")


class PoolingAttentionV1(PoolingAttention):
    """MViT v1 attention: pooled q/k/v, optional class token, 2D or 3D grids.

    Args:
        spatial_dims: 2 for images, 3 for space-time or volumes.
        dim: Input width.
        dim_out: Attention width (and output width); MViT v1 keeps it equal to `dim`.
        num_heads: Attention heads.
        qkv_bias: Bias of the q/k/v projection.
        kernel_q: Query pooling kernel (empty or all ones with stride one: no query pooling).
        kernel_kv: Key/value pooling kernel.
        stride_q: Query pooling stride (the block's downsampling).
        stride_kv: Key/value pooling stride.
        mode: `conv` (depthwise conv + norm), `max` or `avg` pooling.
        has_cls_token: The first token is a class token that is not pooled.
        norm_layer: Norm after each conv pooling (called with the head width).
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        dim_out: int,
        num_heads: int = 1,
        qkv_bias: bool = True,
        kernel_q: Sequence[int] = (),
        kernel_kv: Sequence[int] = (),
        stride_q: Sequence[int] = (),
        stride_kv: Sequence[int] = (),
        mode: str = "conv",
        has_cls_token: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        if mode not in POOL_MODES:
            raise ValueError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")
        n = check_spatial_dims(spatial_dims)
        # the parent builds only 2D conv pools; identity kernels make it build none, and the
        # N-d pools are built here
        super().__init__(
            dim, dim_out, (1, 1), num_heads=num_heads, qkv_bias=qkv_bias, kernel_q=(1, 1),
            kernel_kv=(1, 1), stride_q=(1, 1), stride_kv=(1, 1), residual_pooling=False,
            rel_pos=False, norm_layer=norm_layer,
        )
        self.has_cls_token = has_cls_token
        self.spatial_dims = n
        self.mode = mode
        for name, kernel, stride in (("q", kernel_q, stride_q), ("k", kernel_kv, stride_kv),
                                     ("v", kernel_kv, stride_kv)):
            pool = self._make_pool(kernel, stride)
            setattr(self, f"pool_{name}", pool)
            use_norm = pool is not None and mode == "conv"
            setattr(self, f"norm_{name}", norm_layer(self.head_dim) if use_norm else None)

    def _make_pool(self, kernel: Sequence[int], stride: Sequence[int]) -> nn.Module | None:
        n = self.spatial_dims
        if len(kernel) == 0:
            if len(stride) and math.prod(stride) > 1:
                raise ValueError(f"pooling stride {tuple(stride)} needs a pooling kernel")
            return None
        kernel = tuple(kernel)
        stride = tuple(stride) if len(stride) else (1,) * n
        if len(kernel) != n or len(stride) != n:
            raise ValueError(f"pooling kernel {kernel} and stride {stride} must have {n} entries")
        # a 1x1 stride-1 pool is the identity, and the reference builds none
        if math.prod(kernel) == 1 and math.prod(stride) == 1:
            return None
        padding = tuple(k // 2 for k in kernel)
        if self.mode == "conv":
            return conv_nd(n)(self.head_dim, self.head_dim, kernel, stride=stride, padding=padding,
                              groups=self.head_dim, bias=False)
        pool_cls = {("max", 2): nn.MaxPool2d, ("max", 3): nn.MaxPool3d,
                    ("avg", 2): nn.AvgPool2d, ("avg", 3): nn.AvgPool3d}[(self.mode, n)]
        return pool_cls(kernel, stride, padding)

    def _pool(
        self, t: torch.Tensor, pool: nn.Module | None, norm: nn.Module | None, size: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        if pool is None:
            return t, list(size)
        b, heads, _, c = t.shape
        if self.has_cls_token:
            cls_tok, t = t[:, :, :1], t[:, :, 1:]
        t = t.reshape(b * heads, *size, c).movedim(-1, 1)
        t = pool(t)
        new_size = list(t.shape[2:])
        t = t.reshape(b, heads, c, -1).transpose(2, 3)
        if self.has_cls_token:
            t = torch.cat((cls_tok, t), dim=2)
        # the reference normalises after putting the class token back
        if norm is not None:
            t = norm(t)
        return t, new_size
