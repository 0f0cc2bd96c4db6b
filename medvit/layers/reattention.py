"""Re-attention (Zhou et al., "DeepViT: Towards Deeper Vision Transformer", 2021).

The softmax attention maps of the heads are mixed by a learned H x H matrix theta
(`Re-Attention(Q, K, V) = Norm(theta^T Softmax(QK^T / sqrt(d))) V`) so deep blocks can
regenerate diverse maps instead of collapsing to the same one. As in the official code,
theta is a 1x1 convolution over the head axis (with bias, PyTorch's default
initialisation: the paper does not start it at the identity) and Norm is a BatchNorm over
the heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.attention import Attention
from medvit.layers.attention_capture import record_attention


class ReAttention(Attention):
    """Multi-head self-attention whose maps are mixed across heads after the softmax.

    Drops in as `Block(attn_layer=ReAttention)`; the mixing needs the explicit weights,
    so the fused kernel is never used.

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide `dim`.
        qkv_bias: Bias of the joint q/k/v projection.
        qk_norm: Normalise queries and keys per head.
        attn_drop: Dropout on the softmax weights, before the mixing (as the official code).
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by `qk_norm`.
        scale_mixed: Multiply the normalised mixed maps by the attention scale
            `head_dim ** -0.5` (the official code's `transform_scale`, on for DeepViT-S).
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
        scale_mixed: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1)
        self.var_norm = nn.BatchNorm2d(num_heads)
        self.reatten_scale = self.scale if scale_mixed else 1.0

    def mix(self, attn: torch.Tensor) -> torch.Tensor:
        """Re-generate `(B, heads, N, N)` attention maps: theta over heads, then BatchNorm."""
        return self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        record_attention(self, attn)  # the heads' distributions, before they are re-mixed
        attn = self.mix(self.attn_drop(attn))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attn else x
